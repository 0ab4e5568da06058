"""What the diagnostic writes: positions.csv, diagnose.md and its plots."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ...core.scores import TokenSignals
from ...core.selection import relative_position
from ...training.rollout import Rollout
from .statistics import DECILE_SIGNALS, Analysis, _topn_means, analysis_table

__all__ = [
    "diagnose_markdown",
    "position_columns",
    "write_plots",
    "write_positions",
    "write_results",
    "write_samples",
]


def _ci_text(e: dict[str, Any], key: str = "mean", fmt: str = ".4g") -> str:
    if e.get(key) is None:
        return "n/a"
    text = format(e[key], fmt)
    if e.get("low") is not None:
        text += f" [{e['low']:{fmt}}, {e['high']:{fmt}}]"
    return text


def _topn_markdown(topn: dict) -> str:
    from ...reports.report import write_markdown_table

    ratios = list(next(iter(topn.values())).keys())
    rows = []
    for sel, per in topn.items():
        row = {"selector": sel}
        for r in ratios:
            e = per[r]
            lift = "n/a" if e.get("lift") is None else f"{e['lift']:.2f}"
            q3 = "n/a" if e.get("q3_fraction") is None else f"{e['q3_fraction']:.2f}"
            row[f"ρ = {r}"] = f"{_ci_text(e)}; lift {lift}; Q3 {q3}"
        row["n"] = ", ".join(str(per[r]["n"]) for r in ratios)
        rows.append(row)
    return write_markdown_table(rows, ["selector", *[f"ρ = {r}" for r in ratios], "n"])


def _regression_markdown(reg: dict, r2: dict) -> list[str]:
    from ...reports.report import write_markdown_table

    lines = []
    for model, coefs in reg.items():
        lines.append(f"### {model}: [{', '.join(coefs)}] (R² = {r2[model]:.3f})\n")
        rows = [
            {"term": c, "coef": e["coef"], "low": e["low"], "high": e["high"]}
            for c, e in coefs.items()
        ]
        lines.append(write_markdown_table(rows, ["term", "coef", "low", "high"]))
    return lines


def diagnose_markdown(
    summary: dict[str, Any],
    topn: dict,
    reg: dict,
    r2: dict,
    corr: dict,
    others: dict[str, tuple[dict, dict, dict]] | None = None,
) -> str:
    from ...reports.report import write_markdown_table

    s = summary
    gain_text = {
        "relative": "relative reduction (KL0 − KLτ)/(KL0 + 1e-12)",
        "absolute": "absolute reduction KL0 − KLτ (Eq. 1)",
    }
    lines = [
        "# Fixed-context diagnostic\n",
        f"- bank: {s['n_contexts']} held-out {s['task']} prompts × ≤{s['max_new_tokens']} "
        f"sampled tokens = {s['n_positions']} valid positions ({s['n_analysed']} analysed)",
        f"- update: {s['mode']}"
        + (
            f" ({s['update_steps']} steps of {s['update_batch_size']} prompts, "
            f"{s['update_strategy']}, lr {s['update_lr']:g})"
            if s["mode"] == "opd"
            else f" (one SGD step, η = {s['single_lr']:g}, per updated position)"
        ),
        f"- gain: {gain_text[s['gain_kind']]} of KL(p_T‖p_θ) over the full vocabulary, "
        f"winsorized at {s['winsorize']:g}/{1 - s['winsorize']:g}; mean KL0 {s['kl0_mean']:.4g}, "
        f"mean gain {s['gain_mean']:.4g} ({100 * s['gain_positive_share']:.0f}% of positions > 0)",
        f"- analysis D: {s['divergence']}; signals Eq. 11-normalized (5/95) over the bank",
        f"- intervals: 95% prompt-clustered bootstrap, {s['bootstrap']} draws",
        "",
        "## Matched top-N (every selector keeps n = round(ρ·N) positions)\n",
        "Mean gain of the kept positions [95% interval]; lift = kept mean / bank mean (gain per "
        "kept share); Q3 = share of kept positions in TIP's low-entropy/high-D quadrant.\n",
        _topn_markdown(topn),
        "## Standardized regressions of the gain (z-scored OLS)\n",
        *_regression_markdown(reg, r2),
    ]
    for kind, (t_o, reg_o, r2_o) in (others or {}).items():
        lines += [
            f"## The same with the {gain_text[kind]}\n",
            _topn_markdown(t_o),
            *_regression_markdown(reg_o, r2_o),
        ]
    lines.append("## Spearman correlation with the gain (taopd's extra; not in the paper)\n")
    rows = [{"signal": n, **e} for n, e in corr.items()]
    lines.append(
        write_markdown_table(rows, ["signal", "spearman", "spearman_low", "spearman_high"])
    )
    return "\n".join(lines)


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6, 4)) -> tuple:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def write_plots(
    out: Path, table: dict[str, np.ndarray], gain: np.ndarray, reg: dict, topn: dict
) -> list[Path]:
    """Gain by signal decile, D^L vs D^I coefficients, top-N gain by D^L vs by D^I."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    made = [_decile_plot(plots, table, gain)]
    if "split" in reg:
        made.append(_split_coef_plot(plots, reg["split"]))
    made.append(_learnable_plot(plots, table, gain, topn))
    return made


def _decile_plot(plots: Path, table: dict[str, np.ndarray], gain: np.ndarray) -> Path:
    names = [n for n in DECILE_SIGNALS if n in table]
    ncols = 4
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _figure(nrows, ncols, (4 * ncols, 3 * nrows))
    for ax, name in zip(axes.flat, names, strict=False):
        groups = np.array_split(np.argsort(table[name], kind="mergesort"), 10)
        groups = [g for g in groups if len(g)]
        means = [float(gain[g].mean()) for g in groups]
        errs = [
            1.96 * float(gain[g].std(ddof=1)) / math.sqrt(len(g)) if len(g) > 1 else 0.0
            for g in groups
        ]
        ax.errorbar(range(1, len(groups) + 1), means, yerr=errs, marker="o", capsize=2)
        ax.axhline(float(gain.mean()), color="grey", lw=0.8, ls="--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("decile", fontsize=8)
        ax.set_ylabel("mean gain", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle("Gain by signal decile (95% normal intervals; dashed: bank mean)")
    fig.tight_layout()
    path = plots / "gain_by_decile.png"
    fig.savefig(path)
    return path


def _split_coef_plot(plots: Path, coefs: dict[str, dict[str, Any]]) -> Path:
    labels = list(coefs)
    vals = [coefs[c]["coef"] or 0.0 for c in labels]
    # percentile intervals need not contain the point estimate: clip the bars at 0
    lo = [
        max(0.0, vals[i] - (coefs[c]["low"] if coefs[c]["low"] is not None else vals[i]))
        for i, c in enumerate(labels)
    ]
    hi = [
        max(0.0, (coefs[c]["high"] if coefs[c]["high"] is not None else vals[i]) - vals[i])
        for i, c in enumerate(labels)
    ]
    colours = [
        "tab:green" if c == "D_L" else "tab:red" if c == "D_I" else "tab:grey" for c in labels
    ]
    fig, axes = _figure(size=(7, 4))
    ax = axes[0, 0]
    ax.bar(labels, vals, yerr=[lo, hi], color=colours, capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("standardized coefficient")
    ax.set_title("Gain regression, 'split' model: learnable D^L vs incompatible D^I")
    fig.tight_layout()
    path = plots / "coef_split.png"
    fig.savefig(path)
    return path


def _learnable_plot(
    plots: Path, table: dict[str, np.ndarray], gain: np.ndarray, topn: dict
) -> Path:
    grid = sorted(
        {0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0}
        | {float(r) for r in next(iter(topn.values()), {})}
    )
    curves = _topn_means(table, gain, ["teachability", "incompatible"], grid, None, 0)
    fig, axes = _figure(size=(6.5, 4))
    ax = axes[0, 0]
    for sel, label, colour, shift in (
        ("teachability", "top by D^L = D̃·C̃", "tab:green", 0.97),
        ("incompatible", "top by D^I = D̃(1−C̃)", "tab:red", 1.03),
    ):
        ys = [curves[sel][r][0] for r in grid]
        ax.plot(grid, ys, marker="o", color=colour, label=label)
        for r, e in topn.get(sel, {}).items():
            if e["low"] is not None and e["mean"] is not None:
                err = [[max(0.0, e["mean"] - e["low"])], [max(0.0, e["high"] - e["mean"])]]
                ax.errorbar(
                    [float(r) * shift], [e["mean"]], yerr=err, color=colour, capsize=3,
                    fmt="s", ms=4,
                )  # bootstrap 95% interval  # fmt: skip
    ax.axhline(float(gain.mean()), color="grey", lw=0.8, ls="--", label="all positions")
    ax.set_xscale("log")
    ax.set_xlabel("retention ratio ρ (share of bank positions kept)")
    ax.set_ylabel("mean gain of the kept positions")
    ax.set_title("Learnable vs incompatible disagreement")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = plots / "learnable_vs_incompatible.png"
    fig.savefig(path)
    return path


def write_positions(path: Path, columns: dict[str, Any]) -> None:
    """One CSV row per position; floats with 9 significant digits, NaN as an empty cell."""

    def cell(v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        return format(float(v), ".9g") if math.isfinite(float(v)) else ""

    names = list(columns)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(names)
        for i in range(len(columns[names[0]])):
            w.writerow([cell(columns[n][i]) for n in names])


def position_columns(
    bank: Rollout,
    sig0: TokenSignals,
    kl0: np.ndarray,
    gains: dict[str, np.ndarray],
    tokenizer: Any,
    divergence: str,
    tags: Tensor | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """positions.csv's columns, one row per valid bank position: prompt id, position, token,
    the raw θ0 signals, KL0, the gains and the normalized analysis columns (and `kind`,
    style or other, when `tags` marks planted-style positions); and the raw signals alone."""
    p = bank.prompt_len
    valid = bank.response_mask[:, p:]
    width = valid.shape[1]
    rows_idx = np.flatnonzero(valid.reshape(-1).numpy())
    prompt_id, pos = rows_idx // width, rows_idx % width
    token_ids = bank.input_ids[:, p:].reshape(-1).numpy()[rows_idx]
    columns: dict[str, Any] = {
        "prompt_id": prompt_id,
        "position": pos,
        "token_id": token_ids,
        "token": [tokenizer.decode([int(t)]) for t in token_ids],
    }
    if tags is not None:
        kinds = tags.reshape(-1).numpy()[rows_idx]
        columns["kind"] = np.where(kinds, "style", "other")
    raw = {name: t.double().reshape(-1).numpy()[rows_idx] for name, t in sig0.items()}
    rel = relative_position(valid)  # the rows are flattened below: `early` reads this column
    raw["relative_position"] = rel.reshape(-1).numpy()[rows_idx]
    columns.update(raw)
    columns["kl0"] = kl0.reshape(-1)[rows_idx]
    for name, g in gains.items():
        columns[name] = np.asarray(g, dtype=float).reshape(-1)[rows_idx]
    full_norm = analysis_table({**raw, "position": pos.astype(float)}, divergence)
    for name in ("H", "D", "C", "Ht", "pos", "teachability", "incompatible", "tip", "q3"):
        columns[f"{name}_norm" if name in ("H", "D", "C", "Ht", "pos") else name] = full_norm[name]
    return columns, raw


def write_samples(
    path: Path, samples: list[dict[str, Any]], gain: np.ndarray, valid: Tensor
) -> None:
    """The bank's token-view records with each token's gain added (samples.jsonl)."""
    gain_grid = np.asarray(gain, dtype=float).reshape(valid.shape)
    with open(path, "w") as f:
        for b, rec in enumerate(samples):
            g = gain_grid[b][valid[b].numpy()]
            rec["signals"]["gain"] = [None if not np.isfinite(x) else float(x) for x in g]
            f.write(json.dumps(rec) + "\n")


def write_results(out: Path, summary: dict[str, Any], a: Analysis, start: float) -> None:
    """The statistics' JSON files, plots, diagnose.md and summary.json."""
    summary["wall_seconds"] = time.perf_counter() - start
    (out / "matched_topn.json").write_text(json.dumps(a.topn, indent=2))
    (out / f"matched_topn_{a.other}.json").write_text(json.dumps(a.topn_other, indent=2))
    (out / "regression.json").write_text(json.dumps(a.reg, indent=2))
    (out / f"regression_{a.other}.json").write_text(json.dumps(a.reg_other, indent=2))
    (out / "correlations.json").write_text(json.dumps(a.corr, indent=2))
    write_plots(out, a.table, a.gain, a.reg, a.topn)
    others = {a.other: (a.topn_other, a.reg_other, a.r2_other)}
    text = diagnose_markdown(summary, a.topn, a.reg, a.r2, a.corr, others)
    (out / "diagnose.md").write_text(text)
    summary["wall_seconds"] = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

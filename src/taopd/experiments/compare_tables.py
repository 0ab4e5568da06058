"""A comparison's tables and plots: results.csv (one row per arm and seed), results.md (mean and
95% interval per group, paired differences against teachability), the learning curves.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..training.checkpoint import atomic_write_text
from .arms import Arm

__all__ = ["CSV_FIELDS", "aggregate", "mean_curve", "paired_differences", "write_results"]

CSV_FIELDS = [
    "strategy",
    "ratio",
    "k",
    "batch_size",
    "seed",
    "lr",
    "accuracy",
    "accuracy_before",
    "teacher_accuracy",
    "tokens_trained",
    "steps",
    "wall_seconds",
    "heldout_kl",
    "heldout_kl_before",
    "heldout_kl_other",
    "selected_fraction",
    "kept_per_step",
]

# two-sided 95% Student-t quantiles by degrees of freedom (1..30); normal beyond
_T95 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def _ci95(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    t = _T95[min(len(values) - 1, len(_T95)) - 1] if len(values) - 1 <= len(_T95) else 1.96
    return t * statistics.stdev(values) / math.sqrt(len(values))


def _mean_of(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return statistics.mean(values) if values else float("nan")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± 95% t-interval over seeds for each (strategy, ratio, K, batch size)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["ratio"], r["k"], r["batch_size"]), []).append(r)
    table = []
    for (strategy, ratio, k, bs), rs in groups.items():
        acc = [r["accuracy"] for r in rs if r["accuracy"] not in (None, "")]
        kls = [r["heldout_kl"] for r in rs if r["heldout_kl"] is not None]
        lrs = sorted({float(r["lr"]) for r in rs if r.get("lr") not in (None, "")})
        table.append(
            {
                "strategy": strategy,
                "ratio": ratio,
                "k": k,
                "batch_size": bs,
                "seeds": len(rs),
                "lr": "/".join(f"{x:g}" for x in lrs),
                "accuracy": statistics.mean(acc) if acc else float("nan"),
                "accuracy_ci95": _ci95(acc),
                "tokens_trained": statistics.mean(r["tokens_trained"] for r in rs),
                "selected_fraction": _mean_of(rs, "selected_fraction"),
                "kept_per_step": _mean_of(rs, "kept_per_step"),
                "wall_seconds": statistics.mean(r["wall_seconds"] for r in rs),
                "heldout_kl": statistics.mean(kls) if kls else float("nan"),
                "heldout_kl_other": _mean_of(rs, "heldout_kl_other"),
            }
        )
    table.sort(key=lambda r: (r["batch_size"], -r["ratio"], r["strategy"], r["k"]))
    return table


def _markdown(rows: list[dict[str, Any]]) -> str:
    table = aggregate(rows)
    before = [r["accuracy_before"] for r in rows if r.get("accuracy_before") is not None]
    teacher = [r["teacher_accuracy"] for r in rows if r.get("teacher_accuracy") is not None]
    lines = ["# Selection strategies compared", ""]
    if before:
        lines.append(
            f"Student before training: {100 * statistics.mean(before):.1f}%; "
            f"teacher: {100 * statistics.mean(teacher):.1f}% (mean over seeds)."
        )
        lines.append("")
    other = any(not math.isnan(r["heldout_kl_other"]) for r in table)
    lines.append(
        "| strategy | ratio | lr | effective share | kept / step | K | batch | seeds "
        "| accuracy (mean ± 95% CI) | tokens trained | wall time (s) | held-out KL |"
        + (" held-out KL, non-style |" if other else "")
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if other else ""))
    for r in table:
        ci = "" if math.isnan(r["accuracy_ci95"]) else f" ± {100 * r['accuracy_ci95']:.1f}"
        share = r.get("selected_fraction", float("nan"))
        kept = r.get("kept_per_step", float("nan"))
        acc = "n/a" if math.isnan(r["accuracy"]) else f"{100 * r['accuracy']:.1f}%{ci}"
        lines.append(
            f"| {r['strategy']} | {r['ratio']:g} | {r['lr'] or 'config'} | "
            f"{'n/a' if math.isnan(share) else f'{100 * share:.1f}%'} | "
            f"{'n/a' if math.isnan(kept) else f'{kept:.1f}'} | {r['k']} | {r['batch_size']} | "
            f"{r['seeds']} | {acc} | {r['tokens_trained']:.0f} | "
            f"{r['wall_seconds']:.0f} | {r['heldout_kl']:.4f} |"
            + (f" {r['heldout_kl_other']:.4f} |" if other else "")
        )
    lines.append("")
    diffs = paired_differences(rows)
    other = any(d["heldout_kl_other"] is not None for d in diffs)
    if diffs:
        lines += [
            "Paired differences (mean over seeds of the per-seed difference, 95% t-interval; "
            "ahead / behind when the interval excludes 0, else tied):",
            "",
            "| difference | seeds | accuracy (points) | | held-out KL | |"
            + (" held-out KL, non-style | |" if other else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if other else ""),
        ]
        for d in diffs:
            lines.append(
                f"| {d['difference']} | {d['seeds']} | {_interval(d['accuracy'], 100)} | "
                f"{d['accuracy_word']} | {_interval(d['heldout_kl'])} | {d['heldout_kl_word']} |"
                + (
                    f" {_interval(d['heldout_kl_other'])} | {d['heldout_kl_other_word']} |"
                    if other
                    else ""
                )
            )
        lines.append("")
    lines.append(
        "ratio: the nominal share; effective share: the share of response positions actually "
        "trained on (mean over steps; `+N` arms keep at least N per rollout, so more); "
        "kept / step: positions trained on per step."
    )
    return "\n".join(lines) + "\n"


def _interval(x: tuple[float, float, float] | None, scale: float = 1.0) -> str:
    if x is None or math.isnan(x[0]):
        return "n/a"
    m, lo, hi = (scale * v for v in x)
    digits = 1 if scale == 100 else 3
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float] | None:
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return None
    m = statistics.mean(d)
    h = _ci95(d)
    return (m, m - h, m + h)


def _word(x: tuple[float, float, float] | None, higher_is_better: bool) -> str:
    """'ahead' / 'behind' when the interval excludes 0, 'tied' otherwise (n/a: < 2 seeds)."""
    if x is None or math.isnan(x[1]):
        return "n/a"
    if x[1] > 0:
        return "ahead" if higher_is_better else "behind"
    if x[2] < 0:
        return "behind" if higher_is_better else "ahead"
    return "tied"


def _pairs(groups: list[tuple], reference: str) -> list[tuple[tuple, tuple, str]]:
    """(arm, baseline, label) pairs of the same batch size: the `reference` at each ratio minus
    each other arm at that ratio and minus full OPD; every other arm minus full OPD; and every
    other all-token arm (ratio 1: weight mode) minus the reference at each of its ratios."""

    def name(g: tuple) -> str:
        return g[0] if g[0] == "full" else f"{g[0]} {g[1]:g}"

    out = []
    for a in groups:
        for b in groups:
            if a == b or a[3] != b[3]:
                continue
            if a[0] == reference and b[0] != reference:
                keep = b[1] == a[1] or b[0] == "full"
            else:
                keep = a[0] not in (reference, "full") and (
                    b[0] == "full" or (b[0] == reference and a[1] == 1.0)
                )
            if keep:
                out.append((a, b, f"{name(a)} − {name(b)}"))
    return out


def paired_differences(rows: list[dict[str, Any]], reference: str = "teachability") -> list[dict]:
    """Per-seed paired differences (see `_pairs`: the `reference` against every other arm of
    its ratio and full OPD, every other arm against full OPD and all-token arms against the
    reference): accuracy (higher is better) and held-out KL (lower is better, also on non-style
    positions where measured), each with a 95% t-interval and a word."""
    by_group: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in rows:
        g = by_group.setdefault((r["strategy"], float(r["ratio"]), r["k"], r["batch_size"]), {})
        for key in ("accuracy", "heldout_kl", "heldout_kl_other"):
            if r.get(key) not in (None, ""):
                g.setdefault(key, {})[int(r["seed"])] = float(r[key])
    order = sorted(by_group, key=lambda g: (g[0] != reference, -g[1], g[0], g[2], g[3]))
    out = []
    for a, b, label in _pairs(order, reference):
        ref, vals = by_group[a], by_group[b]
        row: dict[str, Any] = {"difference": label}
        for key, better in (("accuracy", True), ("heldout_kl", False), ("heldout_kl_other", False)):
            x = _paired(ref.get(key, {}), vals.get(key, {}))
            row[key], row[f"{key}_word"] = x, _word(x, better)
        row["seeds"] = len(set(ref.get("heldout_kl", {})) & set(vals.get("heldout_kl", {})))
        out.append(row)
    return out


def mean_curve(curves: list[list[list[Any]]]) -> list[list[float]]:
    """Mean over seeds of [step, tokens, accuracy, held-out KL, ...] points, matched by step.

    Only the steps every seed evaluated are kept, so each point averages the same seeds (a seed
    whose 'before' evaluation is missing does not shift the others' points)."""
    by_step = [{int(p[0]): p for p in c} for c in curves]
    common = sorted(set.intersection(*(set(b) for b in by_step))) if by_step else []
    width = min(len(p) for c in curves for p in c) if common else 0
    return [
        [
            statistics.mean(math.nan if b[step][j] is None else float(b[step][j]) for b in by_step)
            for j in range(width)
        ]
        for step in common
    ]


def _curves(out: Path, rows: list[dict[str, Any]]) -> None:
    """Accuracy and held-out KL vs step and vs tokens trained, mean over seeds per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[list[list[float]]]] = {}
    for r in rows:
        arm = Arm.from_row(r)
        s = json.loads((out / "arms" / r.get("arm", arm.name) / "summary.json").read_text())
        curve = s.get("accuracy_curve") or []
        if curve and r.get("accuracy_before") is not None:
            curve = [[0, 0, r["accuracy_before"], r.get("heldout_kl_before")], *curve]
        if curve:
            variant = f"{arm.ratio:g}" + (f" K{arm.k}" if arm.k != 16 else "")
            variant += f" b{arm.batch_size}" if len({x["batch_size"] for x in rows}) > 1 else ""
            groups.setdefault((arm.label, variant), []).append(curve)
    if not groups:
        return
    (out / "plots").mkdir(exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    # one colour per strategy, one line style per ratio / K / batch: 13 arms stay apart
    palette = plt.get_cmap("tab10").colors
    colours = {name: palette[i % 10] for i, name in enumerate(sorted({n for n, _ in groups}))}
    variants = sorted({v for _, v in groups})
    styles = {v: ("-", "--", ":", "-.")[i % 4] for i, v in enumerate(variants)}
    for (name, variant), curves in sorted(groups.items()):
        mean = mean_curve(curves)
        if not mean:
            continue
        steps = [m[0] for m in mean]
        tokens = [m[1] for m in mean]
        style = {"color": colours[name], "linestyle": styles[variant], "marker": "o"}
        label = f"{name} {variant}"
        axes[0][0].plot(steps, [m[2] for m in mean], label=label, **style)
        axes[0][1].plot(tokens, [m[2] for m in mean], label=label, **style)
        if len(mean[0]) > 3:
            axes[1][0].plot(steps, [m[3] for m in mean], label=label, **style)
            axes[1][1].plot(tokens, [m[3] for m in mean], label=label, **style)
    for ax, (x, y) in zip(
        axes.flat,
        [
            ("step", "accuracy"),
            ("tokens trained", "accuracy"),
            ("step", "held-out KL"),
            ("tokens trained", "held-out KL"),
        ],
    ):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0][1].set_xscale("symlog")
    axes[1][1].set_xscale("symlog")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "learning_curves.png", dpi=110)
    plt.close(fig)


def _training_curves(out: Path, rows: list[dict[str, Any]]) -> None:
    """plots/training_kl.png: each group's reverse KL on its own rollouts at every step (the step
    metric `kl_all`, and `reverse_kl_other` on the non-style positions when tagged), mean over
    seeds: a learning curve that needs no evaluation run (`train.eval_every: 0`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..reports.report import read_jsonl

    keys = (("kl_all", "reverse KL, all positions"), ("reverse_kl_other", "reverse KL, non-style"))
    groups: dict[str, list[dict[int, dict[str, float]]]] = {}
    for r in rows:
        arm = Arm.from_row(r)
        path = out / "arms" / r.get("arm", arm.name) / "metrics.jsonl"
        if not path.exists():
            continue
        steps = {int(m["step"]): m for m in read_jsonl(path, []) if "step" in m and "kl_all" in m}
        if steps:
            groups.setdefault(f"{arm.label} {float(r['ratio']):g}", []).append(steps)
    if not groups:
        return
    shown = [
        (k, t)
        for k, t in keys
        if any(k in m for g in groups.values() for s in g for m in s.values())
    ]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4), squeeze=False)
    for name, seeds in sorted(groups.items()):
        common = sorted(set.intersection(*(set(s) for s in seeds)))
        for ax, (key, title) in zip(axes[0], shown):
            ys = [statistics.mean(float(s[t].get(key, math.nan)) for s in seeds) for t in common]
            ax.plot(common, ys, marker="o", label=name)
            ax.set_title(title)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.set_ylabel("KL on the step's rollouts")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    (out / "plots").mkdir(exist_ok=True)
    fig.savefig(out / "plots" / "training_kl.png", dpi=110)
    plt.close(fig)


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    """results.csv (one row per arm and seed), results.md (aggregated), plots, report.html."""
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r["strategy"], r["ratio"], r["k"], r["seed"])):
            writer.writerow(r)
    if not rows:
        return
    atomic_write_text(out / "results.md", _markdown(rows))
    _curves(out, rows)
    _training_curves(out, rows)
    from ..reports.report import render_report

    render_report(out)

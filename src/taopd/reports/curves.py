"""The training curves of a run: the `METRIC_GROUPS` figures (loss, KL, signals, selection, the
KL's spread, planted style, accuracy, optimization, throughput, step time) and "Other metrics"
figures for any other numeric key of metrics.jsonl, as PNG files: every numeric key is drawn.

Imports matplotlib (object API, Agg canvas, no pyplot state) and numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taopd.core.signal_names import PLOTTED_SIGNALS
from taopd.reports.html_tables import is_finite

__all__ = [
    "CURVE_PREFIX", "MAX_OTHER_PANELS", "METRIC_GROUPS", "PHASES", "Panel", "X_KEYS", "plot_curves",
    "unplotted",
]  # fmt: skip

# (file stem, title, panels); a panel is (title, x key, [(y key, label), ...]). Every metric
# the trainer logs has a place here; any other numeric key goes to the "Other metrics" figures.
Panel = tuple[str, str, list[tuple[str, str]]]
PHASES = (
    "rollout", "teacher", "student_forward", "scoring", "selection", "loss", "backward",
    "optimizer",
)  # fmt: skip


def _both(stem: str, title: str) -> Panel:
    return (title, "step", [(f"{stem}_all", "all tokens"), (f"{stem}_selected", "selected")])


METRIC_GROUPS: list[tuple[str, str, list[Panel]]] = [
    ("loss", "Training loss", [("loss", "step", [("loss", "loss")])]),
    (
        "kl",
        "KL to the teacher: all valid tokens vs the selected ones",
        [
            _both("kl", "reverse KL, training batch"),
            (
                "held-out reverse KL",
                "step",
                [
                    ("heldout_kl", "held-out KL"),
                    ("heldout_kl_style", "planted-style positions"),
                    ("heldout_kl_other", "other positions"),
                ],
            ),
            _both("forward_kl", "forward KL, training batch"),
            _both("kl_sampled", "sampled-token KL estimate (served teacher)"),
        ],
    ),
    (
        "signals",
        "Token signals: selected vs all",
        [_both(name, name.replace("_", " ")) for name in PLOTTED_SIGNALS],
    ),
    (
        "selection",
        "Selection",
        [
            ("selected fraction", "step", [("selected_fraction", "selected fraction")]),
            ("selected tokens", "step", [("n_selected", "n selected")]),
            ("student/teacher top-K overlap", "step", [("overlap_all", "overlap (all)")]),
            ("gradient pass: kept region", "step", [("kept_region_share", "share of tokens")]),
        ],
    ),
    (
        "kl_spread",
        "Where the batch's KL sits (the pilot's gates)",
        [
            (
                "solved and top-5% shares",
                "step",
                [("solved_share", "solved (KL < 0.05)"), ("kl_top5_share", "KL in the top 5%")],
            ),
            (
                "top 5% by KL",
                "step",
                [
                    ("kl_top5_incompatible", "with C < 0.5"),
                    ("top5_overlap", "shared with teachability's top 5%"),
                ],
            ),
            (
                "compatibility C quantiles",
                "step",
                [("compat_q05", "5%"), ("compat_q50", "50%"), ("compat_q95", "95%")],
            ),
        ],
    ),
    (
        "style",
        "Planted-style positions vs the rest",
        [
            (
                "share of planted-style positions",
                "step",
                [
                    ("style_share_all", "of all"),
                    ("style_share_selected", "of the selected"),
                    ("style_share_kl_top5", "of the top 5% by KL"),
                ],
            ),
            (
                "reverse KL",
                "step",
                [("reverse_kl_style", "planted style"), ("reverse_kl_other", "other")],
            ),
            (
                "compatibility C",
                "step",
                [("compatibility_style", "planted style"), ("compatibility_other", "other")],
            ),
        ],
    ),
    (
        "accuracy",
        "Accuracy",
        [
            ("vs step", "step", [("accuracy", "accuracy")]),
            ("vs tokens trained", "tokens_trained", [("accuracy", "accuracy")]),
        ],
    ),
    (
        "optimization",
        "Optimization",
        [
            ("gradient norm", "step", [("grad_norm", "grad norm")]),
            ("learning rate", "step", [("lr", "lr")]),
            ("non-finite steps (cumulative)", "step", [("nonfinite_steps", "skipped steps")]),
        ],
    ),
    (
        "throughput",
        "Throughput and rollouts",
        [
            ("tokens / second", "step", [("tokens_per_second", "tokens/s")]),
            ("tokens trained (cumulative)", "step", [("tokens_trained", "tokens trained")]),
            ("response tokens per step", "step", [("n_valid", "valid response tokens")]),
            ("mean response length", "step", [("response_length", "tokens")]),
        ],
    ),
    (
        "time",
        "Where a step's time goes",
        [
            ("seconds per phase", "step", [(f"{p}_seconds", p) for p in PHASES]),
            ("share of the step", "step", [(f"{p}_share", p) for p in PHASES]),
            ("step seconds", "step", [("step_seconds", "step")]),
        ],
    ),
]
CURVE_PREFIX = "curve_"
MAX_OTHER_PANELS = 12  # panels per "Other metrics" figure (more keys: more figures)
X_KEYS = {"step", "time", "epoch", "wall_time", "timestamp"}  # never drawn as a curve


def _series(
    metrics: Sequence[dict[str, Any]], x_key: str, y_key: str
) -> tuple[list[float], list[float]]:
    """(x, y) points of `y_key`; a missing `tokens_trained` x is interpolated from the steps."""
    lookup: tuple[list[float], list[float]] | None = None
    if x_key != "step":
        known = sorted(
            (float(r["step"]), float(r[x_key]))
            for r in metrics
            if is_finite(r.get("step")) and is_finite(r.get(x_key))
        )
        if known:
            lookup = ([a for a, _ in known], [b for _, b in known])
    xs: list[float] = []
    ys: list[float] = []
    for r in metrics:
        y = r.get(y_key)
        if not is_finite(y):
            continue
        x = r.get(x_key)
        if not is_finite(x):
            if lookup is None or not is_finite(r.get("step")):
                continue
            import numpy as np

            step = float(r["step"])
            if step < lookup[0][0] or step > lookup[0][-1]:
                continue
            x = float(np.interp(step, lookup[0], lookup[1]))
        xs.append(float(x))
        ys.append(float(y))
    order = sorted(range(len(xs)), key=xs.__getitem__)
    return [xs[i] for i in order], [ys[i] for i in order]


def _ema(values: list[float], span: float) -> list[float]:
    alpha = 2.0 / (span + 1.0)
    out: list[float] = []
    acc = values[0]
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _draw(path: Path, title: str, panels: list[Panel], metrics: Sequence[dict[str, Any]]) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = []
    for p_title, x_key, lines in panels:
        data = [(label, *_series(metrics, x_key, y)) for y, label in lines]
        data = [d for d in data if d[1]]
        if data:
            drawn.append((p_title, x_key, data))
    if not drawn:
        return False
    ncols = 1 if len(drawn) == 1 else 2
    nrows = math.ceil(len(drawn) / ncols)
    fig = Figure(figsize=(5.4 * ncols if ncols > 1 else 8.0, 3.3 * nrows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    palette = [
        "#1f5fbf", "#d1492e", "#2b9348", "#7b4fb0", "#e08e0b", "#17a2b8", "#8c564b", "#555555",
    ]  # fmt: skip
    for i, (p_title, x_key, data) in enumerate(drawn):
        ax = axes[i // ncols][i % ncols]
        for j, (label, xs, ys) in enumerate(data):
            c = palette[j % len(palette)]
            if len(xs) > 30:
                ax.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8)
                ax.plot(
                    xs,
                    _ema(ys, max(2.0, len(xs) / 20)),
                    color=c,
                    linewidth=1.6,
                    label=f"{label} (EMA)",
                )
            else:
                ax.plot(xs, ys, color=c, marker="o", markersize=3.5, linewidth=1.4, label=label)
        ax.set_title(p_title, fontsize=10)
        ax.set_xlabel(x_key.replace("_", " "), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        if len(data) > 1 or len(drawn) == 1:
            ax.legend(fontsize=8, frameon=False)
    for k in range(len(drawn), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    return True


def _other_keys(metrics: Sequence[dict[str, Any]]) -> list[str]:
    """Numeric keys of `metrics` outside `METRIC_GROUPS` (and not an x axis), first seen first."""
    known = set(X_KEYS)
    for _, _, panels in METRIC_GROUPS:
        for _, x_key, lines in panels:
            known.add(x_key)
            known.update(y for y, _ in lines)
    others: dict[str, None] = {}
    for r in metrics:
        for k, v in r.items():
            if k not in known and is_finite(v):
                others.setdefault(k)
    return list(others)


def plot_curves(metrics: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Draw the `METRIC_GROUPS` figures and the "Other metrics" ones from metrics records.

    Every key with a finite numeric value is drawn: the trainer's metrics in their groups
    (`out_dir/curve_<group>.png`), any other key in `curve_other.png`, `curve_other-2.png`, ...
    (`MAX_OTHER_PANELS` panels each). Returns the paths written, in group order. Records
    without a finite value of a key are skipped for that key; `unplotted` says which keys have
    none at all.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    for stem, title, panels in METRIC_GROUPS:
        path = out_dir / f"{CURVE_PREFIX}{stem}.png"
        if _draw(path, title, panels, metrics):
            written.append(path)
    others = _other_keys(metrics)
    for i in range(0, len(others), MAX_OTHER_PANELS):
        part = i // MAX_OTHER_PANELS + 1
        panels = [(k, "step", [(k, k)]) for k in others[i : i + MAX_OTHER_PANELS]]
        suffix = "" if part == 1 else f"-{part}"
        title = "Other metrics" if len(others) <= MAX_OTHER_PANELS else f"Other metrics ({part})"
        path = out_dir / f"{CURVE_PREFIX}other{suffix}.png"
        if _draw(path, title, panels, metrics):
            written.append(path)
    return written


def unplotted(metrics: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, why) for each key of `metrics` that no curve shows: it never has a finite number."""
    seen: dict[str, list[Any]] = {}
    for r in metrics:
        for k, v in r.items():
            if k not in X_KEYS:
                seen.setdefault(k, []).append(v)
    out = []
    for k, values in seen.items():
        if any(is_finite(v) for v in values):
            continue
        if all(isinstance(v, bool) for v in values):
            why = "a true/false flag, not a curve"
        elif all(v is None or isinstance(v, float) for v in values):
            why = "no finite value (null or NaN at every logged step)"
        else:
            why = "not a number"
        out.append((k, why))
    return out

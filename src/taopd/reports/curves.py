"""The training curves of a run: the `METRIC_GROUPS` figures (loss, KL, signals, selection,
accuracy, throughput) and one for any other numeric key of metrics.jsonl, as PNG files.

Imports matplotlib (object API, Agg canvas, no pyplot state) and numpy only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taopd.core.signal_names import PLOTTED_SIGNALS
from taopd.reports.html_tables import is_finite

__all__ = ["CURVE_PREFIX", "MAX_OTHER_PANELS", "METRIC_GROUPS", "Panel", "plot_curves"]

# (file stem, title, panels); a panel is (title, x key, [(y key, label), ...]).
Panel = tuple[str, str, list[tuple[str, str]]]
METRIC_GROUPS: list[tuple[str, str, list[Panel]]] = [
    ("loss", "Training loss", [("loss", "step", [("loss", "loss")])]),
    (
        "kl",
        "Reverse KL: all valid tokens vs the selected ones",
        [
            ("training batch", "step", [("kl_all", "all tokens"), ("kl_selected", "selected")]),
            ("held-out", "step", [("heldout_kl", "held-out KL")]),
        ],
    ),
    (
        "signals",
        "Token signals: selected vs all",
        [
            (name, "step", [(f"{name}_all", "all tokens"), (f"{name}_selected", "selected")])
            for name in PLOTTED_SIGNALS
        ],
    ),
    (
        "selection",
        "Selection",
        [
            ("selected fraction", "step", [("selected_fraction", "selected fraction")]),
            ("selected tokens", "step", [("n_selected", "n selected")]),
            ("student/teacher top-K overlap", "step", [("overlap_all", "overlap (all)")]),
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
        "throughput",
        "Throughput",
        [
            ("tokens / second", "step", [("tokens_per_second", "tokens/s")]),
            ("tokens trained (cumulative)", "step", [("tokens_trained", "tokens trained")]),
        ],
    ),
]
CURVE_PREFIX = "curve_"
MAX_OTHER_PANELS = 12


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
    palette = ["#1f5fbf", "#d1492e", "#2b9348", "#7b4fb0"]
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


def plot_curves(metrics: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Draw the `METRIC_GROUPS` figures (and one for any other numeric key) from metrics records.

    Writes `out_dir/curve_<group>.png` for each group with data and returns those paths in group
    order. Records without a finite value of a key are skipped for that key.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    known = {"step", "time", "epoch", "wall_time", "timestamp"}
    for stem, title, panels in METRIC_GROUPS:
        for _, x_key, lines in panels:
            known.add(x_key)
            known.update(y for y, _ in lines)
        path = out_dir / f"{CURVE_PREFIX}{stem}.png"
        if _draw(path, title, panels, metrics):
            written.append(path)
    others: list[str] = []
    for r in metrics:
        for k, v in r.items():
            if k not in known and k not in others and is_finite(v):
                others.append(k)
    if others:
        if len(others) > MAX_OTHER_PANELS:
            warnings.warn(
                f"plot_curves: {len(others)} other metrics, drawing the first {MAX_OTHER_PANELS}",
                stacklevel=2,
            )
        panels = [(k, "step", [(k, k)]) for k in others[:MAX_OTHER_PANELS]]
        path = out_dir / f"{CURVE_PREFIX}other.png"
        if _draw(path, "Other metrics", panels, metrics):
            written.append(path)
    return written

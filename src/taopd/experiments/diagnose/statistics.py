"""The diagnostic's statistics over positions (numpy; rows are positions, `clusters` their
prompt ids), each with a prompt-clustered bootstrap: matched top-N per selector (the selectors
are `selection.strategy_scores`), standardized OLS of the gain, Spearman correlations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...core.scores import TokenSignals, normalize
from ...core.selection import strategy_scores, top_n
from ...errors import UserError

__all__ = [
    "CORRELATION_SIGNALS",
    "DECILE_SIGNALS",
    "DIVERGENCES",
    "INTERACTION_MODEL",
    "REGRESSION_MODELS",
    "REGRESSION_TERMS",
    "SIGNAL_FIELDS",
    "Analysis",
    "analyse",
    "analysis_table",
    "bootstrap_draws",
    "correlations",
    "matched_count",
    "matched_topn",
    "ols_standardized",
    "rankdata",
    "regressions",
    "spearman",
    "winsorize",
]

SIGNAL_FIELDS = tuple(f.name for f in fields(TokenSignals))
REGRESSION_MODELS: dict[str, list[str]] = {
    "base": ["H", "D", "H*D", "pos", "Ht"],
    "+C": ["H", "D", "H*D", "pos", "Ht", "C"],
    "split": ["H", "D_L", "D_I", "pos", "Ht"],
}
"""The released regressions. Terms: H, D, C, Ht, pos are H̃ (student entropy), D̃ (the analysis
divergence, full-vocabulary KL(p_T‖p_θ0) by default), C̃ (exact compatibility mass), teacher
entropy and response position, each normalized (Eq. 11, 5/95) over the bank; D_L = D̃C̃ and
D_I = D̃(1−C̃). The split model has no H̃·D̃ term: D_L + D_I = D̃, so H̃·D̃ beside them is nearly
collinear with the split and can flip its conclusion (all columns z-scored for the fit)."""
INTERACTION_MODEL = {"split+H*D": ["H", "D_L", "D_I", "H*D", "pos", "Ht"]}
"""taopd's earlier split model, kept as an option (`diagnose.split_interaction`)."""
REGRESSION_TERMS = {
    "H": "student entropy H̃ (full vocabulary), Eq. 11-normalized over the bank",
    "D": "analysis divergence D̃ (diagnose.divergence), Eq. 11-normalized",
    "C": "compatibility mass C̃ = Σ_{v∈S^S} p_T(v) (exact), Eq. 11-normalized",
    "Ht": "teacher entropy, Eq. 11-normalized",
    "pos": "position in the response, Eq. 11-normalized",
    "H*D": "H̃·D̃",
    "D_L": "learnable disagreement D^L = D̃·C̃",
    "D_I": "incompatible disagreement D^I = D̃·(1 − C̃)",
}
DIVERGENCES = {"forward_kl": "forward_kl", "union": "disagreement"}
"""diagnose.divergence → the signal used as D in the analysis: the released full-vocabulary
KL(p_T‖p_θ0), or taopd's training signal, Eq. 9's union KL."""
CORRELATION_SIGNALS = (
    "student_entropy", "teacher_entropy", "disagreement", "compatibility", "compatibility_lb",
    "overlap", "reverse_kl", "forward_kl", "log_ratio", "teachability", "incompatible", "tip",
    "position",
)  # fmt: skip
DECILE_SIGNALS = (
    "student_entropy", "teacher_entropy", "disagreement", "compatibility", "teachability",
    "incompatible", "reverse_kl", "forward_kl", "log_ratio", "position",
)  # fmt: skip


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `x` with ties given their average rank (scipy's 'average')."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN if either side is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def bootstrap_draws(clusters: np.ndarray, n_draws: int, seed: int = 0) -> list[np.ndarray]:
    """Row indices of `n_draws` prompt-clustered resamples (clusters drawn with replacement)."""
    clusters = np.asarray(clusters)
    uniq, inverse = np.unique(clusters, return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(uniq)))])
    members = [order[bounds[c] : bounds[c + 1]] for c in range(len(uniq))]
    rng = np.random.default_rng(seed)
    return [
        np.concatenate([members[c] for c in rng.integers(0, len(uniq), len(uniq))])
        for _ in range(n_draws)
    ]


def _interval(values: Sequence[float]) -> tuple[float | None, float | None]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return None, None
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def _num(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def winsorize(x: np.ndarray, q: float = 0.01) -> np.ndarray:
    """`x` clipped to its [q, 1 − q] quantiles (linear interpolation; NaNs kept); q = 0: as is."""
    x = np.asarray(x, dtype=float)
    if not 0.0 <= q < 0.5:
        raise ValueError(f"winsorize: q must be in [0, 0.5), got {q}")
    finite = np.isfinite(x)
    if q == 0 or not finite.any():
        return x.copy()
    lo, hi = np.quantile(x[finite], [q, 1.0 - q])
    return np.where(finite, np.clip(x, lo, hi), x)


def analysis_table(
    signals: dict[str, np.ndarray], divergence: str = "forward_kl"
) -> dict[str, np.ndarray]:
    """Raw signals of the analysed positions plus the columns the statistics use.

    D is the analysis divergence (`DIVERGENCES`: full-vocabulary KL(p_T‖p_θ0) as released, or
    Eq. 9's union KL). Adds H, D, C, Ht, pos (Eq. 11-normalized over these positions),
    D_L = teachability = D̃C̃, D_I = incompatible = D̃(1−C̃), tip = H̃+D̃−H̃D̃, H*D, and q3
    (H̃ ≤ median and D̃ ≥ median, TIP's confident-but-wrong quadrant).
    """
    if divergence not in DIVERGENCES:
        raise UserError(f"diagnose.divergence must be one of {', '.join(DIVERGENCES)}")
    t = {k: np.asarray(v, dtype=float) for k, v in signals.items()}
    n = len(t["student_entropy"])
    valid = torch.ones(n, dtype=torch.bool)

    def norm(name: str) -> np.ndarray:
        if name not in t:
            return np.zeros(n)
        return normalize(torch.as_tensor(t[name], dtype=torch.float64), valid).numpy()

    t["D_raw"] = t[DIVERGENCES[divergence]]
    h, d, c = norm("student_entropy"), norm("D_raw"), norm("compatibility")
    sig = _token_signals(t, None)  # the selectors' own formulas, with D = the analysis D
    scores = {s: strategy_scores(s, sig, valid).numpy() for s in ("teachability", "tip")}
    t.update(
        {
            "H": h,
            "D": d,
            "C": c,
            "Ht": norm("teacher_entropy"),
            "pos": norm("position"),
            "H*D": h * d,
            "D_L": scores["teachability"],
            "D_I": strategy_scores("incompatible", sig, valid).numpy(),
            **scores,
            "q3": ((h <= np.median(h)) & (d >= np.median(d))).astype(float),
        }
    )
    t["incompatible"] = t["D_I"]
    return t


def _token_signals(table: dict[str, np.ndarray], idx: np.ndarray | None) -> TokenSignals:
    """The table's raw signals as TokenSignals, with `disagreement` = the analysis divergence,
    so every selector ranks by the same D the statistics use."""

    def col(name: str) -> Tensor:
        name = "D_raw" if name == "disagreement" and "D_raw" in table else name
        x = table[name] if idx is None else table[name][idx]
        return torch.as_tensor(x, dtype=torch.float64)

    return TokenSignals(**{n: col(n) for n in SIGNAL_FIELDS if n in table})


def matched_count(ratio: float, n_positions: int) -> int:
    """The released matched count n = round(ratio·N) (half up), at least 1."""
    return max(1, min(n_positions, math.floor(ratio * n_positions + 0.5)))


def _topn_masks(
    table: dict[str, np.ndarray],
    selectors: Sequence[str],
    ratios: Sequence[float],
    idx: np.ndarray | None,
    seed: int,
) -> dict[str, dict[float, np.ndarray]]:
    """selector → ratio → bool mask of its top round(ratio·N) positions (of the rows `idx`)."""
    sig = _token_signals(table, idx)
    n_rows = len(sig.student_entropy)
    valid = torch.ones(n_rows, dtype=torch.bool)
    out: dict[str, dict[float, np.ndarray]] = {}
    for sel in selectors:
        gen = torch.Generator().manual_seed(seed)
        scores = strategy_scores(sel, sig, valid, gen)
        out[sel] = {r: top_n(scores, valid, matched_count(r, n_rows)).numpy() for r in ratios}
    return out


def _topn_means(
    table: dict[str, np.ndarray],
    gain: np.ndarray,
    selectors: Sequence[str],
    ratios: Sequence[float],
    idx: np.ndarray | None,
    seed: int,
) -> dict[str, dict[float, tuple[float, int]]]:
    g = gain if idx is None else gain[idx]
    masks = _topn_masks(table, selectors, ratios, idx, seed)
    return {
        sel: {
            r: (float(g[m].mean()) if m.any() else float("nan"), int(m.sum()))
            for r, m in per.items()
        }
        for sel, per in masks.items()
    }


def matched_topn(
    table: dict[str, np.ndarray],
    gains: np.ndarray | dict[str, np.ndarray],
    clusters: np.ndarray,
    selectors: Sequence[str],
    ratios: Sequence[float],
    n_boot: int = 200,
    seed: int = 0,
) -> Any:
    """Matched top-N: every selector keeps its top n = round(ratio·N) positions.

    For each gain (one array, or {name: array} sharing the selections): selector → ratio ("0.05")
    → {mean, low, high, n, share_of_gain, lift, q3_fraction}: the mean gain of the kept
    positions with a 95% prompt-clustered bootstrap interval (each draw resamples prompts and
    recomputes the normalization and the selection), the kept share of the total gain, the gain
    per kept share (lift = kept mean / bank mean) and the share of kept positions in Q3."""
    single = not isinstance(gains, dict)
    named = {"gain": gains} if single else gains
    named = {k: np.asarray(v, dtype=float) for k, v in named.items()}
    point = _topn_masks(table, selectors, ratios, None, seed)
    boot: dict[str, dict[str, dict[float, list[float]]]] = {
        k: {sel: {r: [] for r in ratios} for sel in selectors} for k in named
    }
    for i, idx in enumerate(bootstrap_draws(clusters, n_boot, seed)):
        masks = _topn_masks(table, selectors, ratios, idx, seed + 1 + i)
        for k, g in named.items():
            gi = g[idx]
            for sel in selectors:
                for r in ratios:
                    m = masks[sel][r]
                    boot[k][sel][r].append(float(gi[m].mean()) if m.any() else float("nan"))
    q3 = table.get("q3")
    out: dict[str, Any] = {}
    for k, g in named.items():
        total, mean_all = float(g.sum()), float(g.mean())
        out[k] = {}
        for sel in selectors:
            out[k][sel] = {}
            for r in ratios:
                m = point[sel][r]
                mean = float(g[m].mean()) if m.any() else float("nan")
                lo, hi = _interval(boot[k][sel][r])
                out[k][sel][f"{r:g}"] = {
                    "mean": _num(mean),
                    "low": lo,
                    "high": hi,
                    "n": int(m.sum()),
                    "share_of_gain": _num(float(g[m].sum()) / total) if total else None,
                    "lift": _num(mean / mean_all) if mean_all else None,
                    "q3_fraction": _num(float(q3[m].mean())) if q3 is not None else None,
                }
    return out["gain"] if single else out


def topn_by_kind(
    table: dict[str, np.ndarray],
    gain: np.ndarray,
    kinds: np.ndarray,
    selectors: Sequence[str],
    ratios: Sequence[float],
    seed: int = 0,
) -> dict[str, Any]:
    """The matched top-N selections split by position kind (planted style vs other): per
    selector and ratio, the share of kept positions that are style positions and the mean gain
    of the kept positions of each kind (point estimates; the bank's means per kind as "bank")."""
    style = np.asarray(kinds) == "style"
    masks = _topn_masks(table, selectors, ratios, None, seed)

    def mean(m: np.ndarray) -> float | None:
        return _num(float(gain[m].mean())) if m.any() else None

    out: dict[str, Any] = {
        "bank": {"style_share": _num(float(style.mean())), "style": mean(style),
                 "other": mean(~style)},
    }  # fmt: skip
    for sel in selectors:
        out[sel] = {
            f"{r:g}": {
                "n": int(m.sum()),
                "style_share": _num(float(style[m].mean())) if m.any() else None,
                "gain_style": mean(m & style),
                "gain_other": mean(m & ~style),
            }
            for r, m in masks[sel].items()
        }
    return out


def ols_standardized(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients of z-scored y on z-scored columns of x (with intercept), and R².

    Constant columns get coefficient 0 (lstsq's minimum-norm solution)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)

    def z(a: np.ndarray) -> np.ndarray:
        sd = a.std(axis=0)
        return (a - a.mean(axis=0)) / np.where(sd > 0, sd, 1.0)

    xz, yz = z(x), z(y)
    design = np.column_stack([np.ones(len(yz)), xz])
    beta, *_ = np.linalg.lstsq(design, yz, rcond=None)
    resid = yz - design @ beta
    ss = float((yz * yz).sum())
    r2 = 1.0 - float((resid * resid).sum()) / ss if ss > 0 else float("nan")
    return beta[1:], r2


def regressions(
    table: dict[str, np.ndarray],
    gain: np.ndarray,
    clusters: np.ndarray,
    models: dict[str, list[str]] | None = None,
    n_boot: int = 200,
    seed: int = 0,
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, float]]:
    """{model: {coef: {coef, low, high}}} of standardized OLS fits with cluster-bootstrap 95%
    intervals (prompts resampled, normalized columns kept), and {model: R²}."""
    models = models or REGRESSION_MODELS
    draws = bootstrap_draws(clusters, n_boot, seed)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    r2s: dict[str, float] = {}
    for name, cols in models.items():
        x = np.column_stack([table[c] for c in cols])
        coef, r2 = ols_standardized(x, gain)
        boot = np.array([ols_standardized(x[i], gain[i])[0] for i in draws]).reshape(-1, len(cols))
        out[name] = {}
        for j, c in enumerate(cols):
            lo, hi = _interval(boot[:, j].tolist())
            out[name][c] = {"coef": _num(coef[j]), "low": lo, "high": hi}
        r2s[name] = r2
    return out, r2s


def correlations(
    table: dict[str, np.ndarray],
    gain: np.ndarray,
    clusters: np.ndarray,
    names: Sequence[str] = CORRELATION_SIGNALS,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, dict[str, float | None]]:
    """signal → {spearman, spearman_low, spearman_high} with the gain (cluster bootstrap)."""
    draws = bootstrap_draws(clusters, n_boot, seed)
    out: dict[str, dict[str, float | None]] = {}
    for name in names:
        if name not in table:
            continue
        x = table[name]
        lo, hi = _interval([spearman(x[i], gain[i]) for i in draws])
        out[name] = {"spearman": _num(spearman(x, gain)), "spearman_low": lo, "spearman_high": hi}
    return out


@dataclass
class Analysis:
    """The statistics of one diagnostic, over the positions with a gain (`keep`)."""

    keep: np.ndarray  # bool per position row: has a finite gain
    table: dict[str, np.ndarray]  # analysis_table of the kept positions
    gain: np.ndarray  # the primary gain, winsorized
    gains: dict[str, np.ndarray]  # "relative" / "absolute", winsorized
    primary: str
    other: str
    models: dict[str, list[str]]
    topn: Any
    topn_other: Any
    reg: dict[str, Any]
    r2: dict[str, float]
    reg_other: dict[str, Any]
    r2_other: dict[str, float]
    corr: dict[str, Any]


def analyse(
    columns: dict[str, Any], raw: dict[str, np.ndarray], dcfg: Any, progress: bool
) -> Analysis:
    """Matched top-N, regressions (both gain kinds) and correlations of the positions with a
    gain; each gain winsorized (released: 1/99)."""
    from tqdm.auto import tqdm

    keep = np.isfinite(columns["gain"])
    pos = columns["position"]
    table = analysis_table(
        {
            **{n: v[keep] for n, v in raw.items()},
            "position": pos[keep].astype(float),
            "kl0": columns["kl0"][keep],
        },
        dcfg.divergence,
    )
    primary = "relative" if dcfg.relative else "absolute"
    other = "absolute" if dcfg.relative else "relative"
    gains = {
        kind: winsorize(columns[f"gain_{kind}"][keep], dcfg.winsorize) for kind in (primary, other)
    }
    gain = gains[primary]
    clusters = columns["prompt_id"][keep]
    if keep.sum() < 3:
        raise UserError(f"only {int(keep.sum())} positions have a gain; nothing to analyse")
    boot = dict(n_boot=dcfg.bootstrap, seed=dcfg.seed)
    bar = tqdm(total=3, desc="statistics (bootstrap)", disable=not progress)
    topn_all = matched_topn(
        table, gains, clusters, dcfg.selectors, dcfg.ratios, dcfg.bootstrap, dcfg.seed
    )
    bar.update(1)
    models = {**REGRESSION_MODELS, **(INTERACTION_MODEL if dcfg.split_interaction else {})}
    reg, r2 = regressions(table, gain, clusters, models, **boot)
    reg_other, r2_other = regressions(table, gains[other], clusters, models, **boot)
    bar.update(1)
    corr = correlations(table, gain, clusters, **boot)
    bar.update(1)
    bar.close()
    return Analysis(
        keep, table, gain, gains, primary, other, models, topn_all[primary], topn_all[other],
        reg, r2, reg_other, r2_other, corr,
    )  # fmt: skip

"""Selection strategies (Eqs. 12-16) and the top-n rule (Eq. 13): scores in, a bool token mask out.

Imports torch only. A strategy maps `TokenSignals` (and the valid mask) to one score per position;
`select` keeps the top ⌈ratio·|valid|⌉ valid positions of the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .scores import TokenSignals, normalize, quantile, teachability_of

__all__ = [
    "STRATEGIES",
    "STRATEGY_SIGNALS",
    "strategies_without",
    "strategy_scores",
    "select",
    "select_tokens",
    "count_for",
    "relative_position",
    "top_n",
]

ScoreFn = Callable[[TokenSignals, Tensor, torch.Generator | None], Tensor]


def _n(sig: TokenSignals, valid: Tensor, name: str) -> Tensor:
    return normalize(getattr(sig, name), valid)


def _soft_or(a: Tensor, b: Tensor) -> Tensor:
    return a + b - a * b


def _median(x: Tensor, valid: Tensor) -> Tensor:
    """Median with linear interpolation over the valid positions."""
    return quantile(x[valid], 0.5)


def _full(sig: TokenSignals, valid: Tensor, gen: torch.Generator | None) -> Tensor:
    return torch.ones_like(sig.student_entropy)


def _random(sig: TokenSignals, valid: Tensor, gen: torch.Generator | None) -> Tensor:
    ref = sig.student_entropy
    return torch.rand(ref.shape, generator=gen, device=ref.device, dtype=ref.dtype)


def relative_position(valid: Tensor) -> Tensor:
    """t / T_i per position: its index among its row's valid positions (last dim) over their
    count, in [0, 1); invalid positions get 1."""
    v = valid.to(torch.int64)
    count = v.sum(-1, keepdim=True).clamp_min(1)
    rel = (v.cumsum(-1) - v).to(torch.float64) / count
    return rel.masked_fill(~valid.to(torch.bool), 1.0)


def _early(sig: TokenSignals, valid: Tensor, gen: torch.Generator | None) -> Tensor:
    """The position rule (arXiv 2606.22600, ESR 2605.27028): 1 − t/T_i, so the top share ρ of the
    batch is about the first ρ of every rollout (scope="sequence": exactly its first ⌈ρ·T_i⌉)."""
    ref = sig.student_entropy
    rel = sig.relative_position if sig.relative_position is not None else relative_position(valid)
    return (1.0 - rel).to(device=ref.device, dtype=ref.dtype)


def _teach(sig: TokenSignals, valid: Tensor) -> Tensor:
    return teachability_of(sig, valid)


def _q3(sig: TokenSignals, valid: Tensor, gen: torch.Generator | None) -> Tensor:
    """TIP's "confident but wrong" quadrant: H̃ below its median and D̃ at or above its median.

    Positions outside the quadrant score -inf (never selected); inside, ranked by D̃.
    """
    h, d = _n(sig, valid, "student_entropy"), _n(sig, valid, "disagreement")
    if not bool(valid.any()):
        return torch.zeros_like(h)
    inside = (h < _median(h, valid)) & (d >= _median(d, valid))
    return d.masked_fill(~inside, -math.inf)


STRATEGIES: dict[str, ScoreFn] = {
    "full": _full,
    "random": _random,
    "entropy": lambda s, v, g: _n(s, v, "student_entropy"),
    "divergence": lambda s, v, g: _n(s, v, "disagreement"),
    "reverse_kl": lambda s, v, g: _n(s, v, "reverse_kl"),
    "compatibility": lambda s, v, g: _n(s, v, "compatibility"),
    "teachability": lambda s, v, g: _teach(s, v),
    "incompatible": lambda s, v, g: _n(s, v, "disagreement") * (1 - _n(s, v, "compatibility")),
    "tip": lambda s, v, g: _soft_or(_n(s, v, "student_entropy"), _n(s, v, "disagreement")),
    "teachability_entropy": lambda s, v, g: _soft_or(_n(s, v, "student_entropy"), _teach(s, v)),
    "q3": _q3,
    "early": _early,
}
"""Named per-position scores. D̃, C̃, H̃ are Eq. 11-normalized over the valid positions:
teachability D̃·C̃ (Eq. 12, D^L); incompatible D̃(1-C̃) (D^I); tip H̃+D̃-H̃D̃; teachability_entropy
H̃+s-H̃s; q3 D̃ restricted to low-entropy/high-divergence positions; early 1 − t/T_i (a position
rule: the earliest share of every rollout); full keeps everything."""


_H, _D, _C = "student_entropy", "disagreement", "compatibility"
STRATEGY_SIGNALS: dict[str, tuple[str, ...]] = {
    "full": (),
    "random": (),
    "entropy": (_H,),
    "divergence": (_D,),
    "reverse_kl": ("reverse_kl",),
    "compatibility": (_C,),
    "teachability": (_D, _C),
    "incompatible": (_D, _C),
    "tip": (_H, _D),
    "teachability_entropy": (_H, _D, _C),
    "q3": (_H, _D),
    "early": (),
}
"""The `TokenSignals` fields each strategy reads (checked before scoring)."""


def strategies_without(missing: tuple[str, ...] | set[str]) -> list[str]:
    """The strategies that read none of the signals named in `missing`."""
    return [s for s, need in STRATEGY_SIGNALS.items() if not set(need) & set(missing)]


def _valid_like(scores: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if valid.shape != scores.shape:
        raise ValueError(f"valid has shape {tuple(valid.shape)}, scores {tuple(scores.shape)}")
    return valid.to(torch.bool)


def strategy_scores(
    strategy: str,
    signals: TokenSignals,
    valid: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Score every position with a named strategy (see STRATEGIES); invalid positions get -inf."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {', '.join(sorted(STRATEGIES))}; got {strategy!r}"
        )
    valid = _valid_like(signals.student_entropy, valid)
    for name in STRATEGY_SIGNALS[strategy]:  # NaN = not available (e.g. a teacher served top-k)
        x = getattr(signals, name)
        if bool(valid.any()) and bool(torch.isnan(x[valid]).all()):
            raise ValueError(
                f"strategy {strategy!r} needs the signal {name!r}, which these signals do not "
                f"carry (NaN); strategies that work: {', '.join(strategies_without((name,)))}"
            )
    scores = STRATEGIES[strategy](signals, valid, generator)
    return scores.masked_fill(~valid, -math.inf)


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if not (0.0 < float(ratio) <= 1.0) or math.isnan(ratio):
        raise ValueError(f"ratio must be in (0, 1] (share of valid positions kept), got {ratio}")
    return float(ratio)


def count_for(ratio: float, n_valid: int) -> int:
    """n = ⌈ratio·n_valid⌉ (Eq. 13), with float noise below 1e-9 dropped (0.05·100 keeps 5)."""
    ratio = _check_ratio(ratio)
    return min(n_valid, math.ceil(round(ratio * n_valid, 9)))


def _top_n(scores: Tensor, eligible: Tensor, n: int) -> Tensor:
    """Mask of the n highest eligible scores of a 1-D tensor; ties go to the earlier position."""
    mask = torch.zeros_like(eligible)
    if n <= 0:
        return mask
    keyed = scores.masked_fill(~eligible, -math.inf)
    order = torch.sort(keyed, descending=True, stable=True).indices
    n = min(n, int(eligible.sum()))
    mask[order[:n]] = True
    return mask


def top_n(scores: Tensor, valid: Tensor | None, n: int) -> Tensor:
    """Mask of the `n` highest valid scores of the whole tensor, ties to the earlier position
    (`select` with an explicit count, e.g. the diagnostic's matched n = round(ρ·N))."""
    valid = _valid_like(scores, valid)
    scores = scores.float() if not scores.is_floating_point() else scores
    eligible = valid & ~torch.isnan(scores) & (scores != -math.inf)
    return _top_n(scores.reshape(-1), eligible.reshape(-1), n).reshape(scores.shape)


def select(
    scores: Tensor,
    valid: Tensor | None = None,
    ratio: float = 0.05,
    scope: str = "batch",
    min_per_sequence: int = 0,
) -> Tensor:
    """Bool mask of the top n = ⌈ratio·|valid|⌉ valid positions (Eq. 13), ties to the earlier one.

    scope="batch" ranks all positions of the call together (the paper's rule); scope="sequence"
    applies the rule to each row of the last dim. Positions scored -inf or NaN are never kept (so a
    restricted strategy such as q3 may keep fewer). min_per_sequence=1 then adds each non-empty
    sequence's best position if it has none (the authors' code). ratio=1 keeps every valid position.
    """
    ratio = _check_ratio(ratio)
    if scope not in ("batch", "sequence"):
        raise ValueError(f"scope must be 'batch' or 'sequence', got {scope!r}")
    if min_per_sequence < 0:
        raise ValueError(f"min_per_sequence must be >= 0, got {min_per_sequence}")
    valid = _valid_like(scores, valid)
    scores = scores.float() if not scores.is_floating_point() else scores
    eligible = valid & ~torch.isnan(scores) & (scores != -math.inf)
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension (positions)")
    seq_len = scores.shape[-1]
    s2 = scores.reshape(-1, seq_len)
    v2, e2 = valid.reshape(-1, seq_len), eligible.reshape(-1, seq_len)
    if scope == "batch":
        mask = _top_n(s2.reshape(-1), e2.reshape(-1), count_for(ratio, int(v2.sum())))
        mask = mask.reshape(s2.shape)
    else:
        mask = (
            torch.stack(
                [_top_n(s2[i], e2[i], count_for(ratio, int(v2[i].sum()))) for i in range(len(s2))]
            )
            if len(s2)
            else torch.zeros_like(e2)
        )
    if min_per_sequence:
        for i in range(len(s2)):
            missing = min_per_sequence - int(mask[i].sum())
            if missing > 0:
                mask[i] |= _top_n(s2[i], e2[i] & ~mask[i], missing)
    return mask.reshape(scores.shape)


def select_tokens(
    signals: TokenSignals,
    valid: Tensor | None = None,
    strategy: str = "teachability",
    ratio: float = 0.05,
    scope: str = "batch",
    min_per_sequence: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Score with a named strategy, then `select`: the token mask for a loss (full keeps all)."""
    scores = strategy_scores(strategy, signals, valid, generator)
    if strategy == "full":
        ratio = 1.0
    return select(scores, valid, ratio, scope=scope, min_per_sequence=min_per_sequence)

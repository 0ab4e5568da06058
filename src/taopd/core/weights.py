"""Soft token weights: train on every valid position, each with a weight (selection.mode=weight).

Imports torch only. Two kinds of rule:
- a strategy's score as a weight (`score_weights`): w_t ∝ f + (1 − f)·s_t with s_t the strategy's
  score in [0, 1] (every named strategy but `random` and `iw_opd` is, after Eq. 11) and f the
  floor, rescaled to mean 1 over the valid positions, so the loss keeps full OPD's scale
  (soft reweighting in the spirit of FiRe-OPD, arXiv 2606.02684);
- IW-OPD (arXiv 2606.22600, as TRL 1.16 implements it): w_t = 1 + γ(1 − Σ_{s<t}|a_s| /
  max(Σ_s|a_s|, ε)) per rollout, a_t = log p_T(y_t) − log p_θ(y_t): weights in [1, 1 + γ] that fall
  as the prefix accumulates student–teacher discrepancy (not rescaled: the paper's values).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .scores import TokenSignals
from .selection import STRATEGIES, _valid_like, strategy_scores

__all__ = [
    "MODES",
    "WEIGHT_ONLY",
    "check_mode",
    "iw_opd_weights",
    "score_weights",
    "token_weights",
]

MODES = ("select", "weight")
"""selection.mode: `select` keeps the top share of positions (Eq. 13); `weight` trains on every
valid position with a per-position weight."""
WEIGHT_ONLY = ("iw_opd",)
"""Rules that define weights, not a ranking: only `mode="weight"` uses them."""
NO_WEIGHT = ("random",)
"""Strategies whose score is no weight (uniform noise): refused in `mode="weight"`."""


def check_mode(strategy: str, mode: str, ratio: float = 1.0) -> None:
    """Refuse the combinations that mean nothing, with one line saying what to set instead."""
    if mode not in MODES:
        raise ValueError(f"selection mode must be one of {', '.join(MODES)}; got {mode!r}")
    if strategy not in STRATEGIES and strategy not in WEIGHT_ONLY:
        names = ", ".join(sorted((*STRATEGIES, *WEIGHT_ONLY)))
        raise ValueError(f"strategy must be one of {names}; got {strategy!r}")
    if mode == "select" and strategy in WEIGHT_ONLY:
        raise ValueError(
            f"strategy {strategy!r} gives token weights, not a ranking: use it with "
            "selection mode 'weight' (it trains on every valid position)"
        )
    if mode == "weight" and strategy in NO_WEIGHT:
        raise ValueError(f"strategy {strategy!r} has no meaning as a weight: use mode 'select'")
    if mode == "weight" and ratio < 1.0:
        raise ValueError(
            f"selection mode 'weight' trains on every valid position, so a budget ratio {ratio:g} "
            "< 1 means nothing there: set the ratio to 1 (or use mode 'select' for a budget)"
        )


def iw_opd_weights(
    log_ratio: Tensor, valid: Tensor | None = None, gamma: float = 0.5, eps: float = 1e-8
) -> Tensor:
    """IW-OPD weights [..., T] from the sampled-token log-ratio log p_θ(y_t) − log p_T(y_t)
    (arXiv 2606.22600; TRL 1.16 `IWOPDTrainer._compute_iw_opd_loss`); invalid positions get 0.

    Each row of the last dim is one rollout: w_t = 1 + γ·(1 − Σ_{s<t}|a_s| / max(Σ_s|a_s|, ε))."""
    if gamma < 0:
        raise ValueError(f"IW-OPD gamma must be >= 0, got {gamma}")
    valid = _valid_like(log_ratio, valid)
    a = torch.where(valid, log_ratio.detach().abs(), torch.zeros_like(log_ratio))
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    prefix = a.cumsum(-1) - a
    total = a.sum(-1, keepdim=True).clamp_min(eps)
    w = 1.0 + gamma * (1.0 - prefix / total)
    return torch.where(valid, w, torch.zeros_like(w))


def score_weights(scores: Tensor, valid: Tensor | None = None, floor: float = 0.1) -> Tensor:
    """Weights of mean 1 over the valid positions from scores in [0, 1] (clipped there; -inf and
    NaN count as 0): w_t = (f + (1 − f)·s_t) / mean_valid(f + (1 − f)·s). Invalid positions get 0.

    The floor f ∈ [0, 1] keeps every position in the loss (f = 1: full OPD); f = 0 weights by the
    score alone. If every valid score is 0 and f = 0, the weights are uniform (full OPD)."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"weight floor must be in [0, 1], got {floor}")
    valid = _valid_like(scores, valid)
    s = torch.nan_to_num(scores.float(), nan=0.0, neginf=0.0, posinf=1.0).clamp(0.0, 1.0)
    raw = torch.where(valid, floor + (1.0 - floor) * s, torch.zeros_like(s))
    n = int(valid.sum())
    if n == 0:
        return raw
    mean = raw.sum() / n
    if float(mean) <= 0.0:
        return valid.to(raw.dtype)
    return raw / mean


def token_weights(
    signals: TokenSignals,
    valid: Tensor | None = None,
    strategy: str = "teachability",
    floor: float = 0.1,
    gamma: float = 0.5,
    eps: float = 1e-8,
) -> Tensor:
    """Per-position loss weights of a named rule (selection.mode=weight): IW-OPD's own weights,
    or a strategy's score through `score_weights`. Pass with every valid position kept."""
    check_mode(strategy, "weight")
    valid = _valid_like(signals.student_entropy, valid)
    if strategy == "iw_opd":
        if signals.log_ratio is None:
            raise ValueError(
                "strategy 'iw_opd' needs the sampled-token log-ratio (signals.log_ratio): score "
                "with the sampled tokens (tokens=...)"
            )
        return iw_opd_weights(signals.log_ratio, valid, gamma, eps)
    return score_weights(strategy_scores(strategy, signals, valid), valid, floor)

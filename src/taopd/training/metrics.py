"""A training step's logged signal metrics: each signal's mean over all response positions
(`<name>_all`) and over the selected ones (`<name>_selected`), named by signal_names.py."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.scores import TokenSignals, teachability_of
from ..core.signal_names import METRIC_SIGNALS

__all__ = ["kl_concentration", "signal_metrics"]


def _mean(x: Tensor, m: Tensor) -> float:
    return float(x[m].mean()) if bool(m.any()) else float("nan")


def signal_metrics(
    sig: TokenSignals, valid: Tensor, mask: Tensor, full_distribution: bool = True
) -> dict[str, float]:
    """Mean of each signal over all response positions (`*_all`) and the selected (`*_selected`).

    Teachability is normalized over this batch (Eq. 11-12). Without the teacher's full
    distribution (a served teacher) the signals it cannot give are left out and `kl_sampled`
    (the sampled-token estimate of KL(S‖T)) is added.
    """
    teach = teachability_of(sig, valid)
    values = {
        s.metric: teach if s.field == "teachability" else getattr(sig, s.field)
        for s in METRIC_SIGNALS
    }
    if not full_distribution:
        values = {n: x for n, x in values.items() if not bool(torch.isnan(x).all())}
        values["kl_sampled"] = sig.log_ratio
    out: dict[str, float] = {}
    for name, x in values.items():
        out[f"{name}_all"] = _mean(x, valid)
        out[f"{name}_selected"] = _mean(x, mask)
    out["overlap_all"] = _mean(sig.overlap, valid)
    out.update(kl_concentration(sig.reverse_kl, valid))
    return out


def kl_concentration(kl: Tensor, valid: Tensor, solved: float = 0.05) -> dict[str, float]:
    """How a batch's reverse KL is spread (the CoT pilot gate): the share of valid positions
    already solved (KL < `solved` nats) and the share of the total KL held by the top 5%."""
    x = kl[valid].double()
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return {"solved_share": float("nan"), "kl_top5_share": float("nan")}
    n = math.ceil(0.05 * x.numel())
    total = float(x.clamp_min(0).sum())
    top = float(x.clamp_min(0).topk(n).values.sum())
    return {
        "solved_share": float((x < solved).double().mean()),
        "kl_top5_share": top / total if total > 0 else float("nan"),
    }

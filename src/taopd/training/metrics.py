"""A training step's logged signal metrics: each signal's mean over all response positions
(`<name>_all`) and over the selected ones (`<name>_selected`), named by signal_names.py."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core.scores import TokenSignals, teachability_of
from ..core.signal_names import METRIC_SIGNALS

__all__ = [
    "disagreement_kinds", "kind_metrics", "kl_concentration", "run_summary", "signal_metrics",
    "weight_metrics",
]  # fmt: skip


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
    if full_distribution:
        out.update(disagreement_kinds(sig, valid, teach))
    return out


def weight_metrics(
    sig: TokenSignals, valid: Tensor, weights: Tensor, full_distribution: bool = True
) -> dict[str, float]:
    """selection.mode=weight: the weights' range over this rank's valid positions and each
    signal's weight-averaged mean (`<name>_weighted`, Σ w·x / Σ w), beside `*_all`."""
    w = weights.double()
    wv = w[valid]
    if wv.numel() == 0 or float(wv.sum()) <= 0:
        return {}
    out = {"weight_min": float(wv.min()), "weight_max": float(wv.max())}
    out["weight_mean"] = float(wv.mean())
    teach = teachability_of(sig, valid)
    for s in METRIC_SIGNALS:
        x = (teach if s.field == "teachability" else getattr(sig, s.field)).double()
        if not full_distribution and bool(torch.isnan(x).all()):
            continue
        out[f"{s.metric}_weighted"] = float((x[valid] * wv).sum() / wv.sum())
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


def _top(x: Tensor, valid: Tensor, share: float) -> Tensor:
    """Indices (into x[valid]) of the top ⌈share·n⌉ valid positions by x."""
    v = x[valid].double().nan_to_num(nan=-float("inf"))
    return v.topk(math.ceil(share * v.numel())).indices


def disagreement_kinds(
    sig: TokenSignals, valid: Tensor, teach: Tensor | None = None, share: float = 0.05
) -> dict[str, float]:
    """Whether raw disagreement and teachability part ways in this batch (the `mismatch` pilot
    gate): the share of the top 5% positions by reverse KL whose exact C (Eq. 10) is below 0.5
    (the teacher's mass sits off the student's top-K: incompatible), the overlap of the top-5%
    sets by teachability and by reverse KL, and the 5/50/95% quantiles of C."""
    if not bool(valid.any()):
        nan = float("nan")
        keys = ("kl_top5_incompatible", "top5_overlap", "compat_q05", "compat_q50", "compat_q95")
        return dict.fromkeys(keys, nan)
    teach = teachability_of(sig, valid) if teach is None else teach
    by_kl, by_teach = _top(sig.reverse_kl, valid, share), _top(teach, valid, share)
    c = sig.compatibility[valid].double()
    q = torch.quantile(c, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    shared = len(set(by_kl.tolist()) & set(by_teach.tolist()))
    return {
        "kl_top5_incompatible": float((c[by_kl] < 0.5).double().mean()),
        "top5_overlap": shared / by_kl.numel(),
        "compat_q05": float(q[0]),
        "compat_q50": float(q[1]),
        "compat_q95": float(q[2]),
    }


def kind_metrics(
    sig: TokenSignals, valid: Tensor, mask: Tensor, tags: Tensor | None
) -> dict[str, float]:
    """Split by position kind (planted style vs the rest; `tags`, None: no split): the style
    share of all, selected and top-5%-by-KL positions, and reverse KL and C on each kind."""
    if tags is None:
        return {}
    style, other = valid & tags, valid & ~tags
    by_kl = _top(sig.reverse_kl, valid, 0.05)
    return {
        "style_share_all": _mean(tags.double(), valid),
        "style_share_selected": _mean(tags.double(), mask),
        "style_share_kl_top5": float(tags[valid][by_kl].double().mean())
        if by_kl.numel()
        else float("nan"),
        "reverse_kl_style": _mean(sig.reverse_kl, style),
        "reverse_kl_other": _mean(sig.reverse_kl, other),
        "compatibility_style": _mean(sig.compatibility, style),
        "compatibility_other": _mean(sig.compatibility, other),
    }


def run_summary(
    t: Any, after: float | None, kl_after: float | None, seconds: float
) -> dict[str, Any]:
    """A run's summary.json from its Trainer `t`: accuracies and held-out KLs before and after
    (its history, `after`, `kl_after`), what it trained, its settings and `seconds` of wall time."""
    h, cfg = t.history, t.cfg
    fr = h.get("selected_fractions") or [float("nan")]
    return {
        "teacher_accuracy": h.get("teacher_accuracy"),
        "student_accuracy_before": h.get("student_accuracy_before"),
        "student_accuracy_after": after,
        "n_test": len(t.test_examples),
        "eval_split": cfg.eval.split,
        "heldout_kl_before": h.get("heldout_kl_before"),
        "heldout_kl": kl_after,
        **{k: h.get(k) for k in h if k.startswith("heldout_kl_") and k != "heldout_kl_before"},
        "selected_fraction": sum(fr) / len(fr),
        "tokens_trained": t.tokens_trained,
        "steps": t.step,
        "strategy": cfg.selection.strategy,
        "mode": cfg.selection.mode,
        "ratio": cfg.selection.ratio,
        "k": cfg.selection.k,
        "batch_size": cfg.train.batch_size,
        "world_size": t.world,
        "threads": t.threads,  # torch's CPU threads (train.threads, or the free cores)
        "fsdp": t.engine.name == "fsdp",
        "deepspeed": t.engine.name == "deepspeed",
        "seed": cfg.train.seed,
        "lr": cfg.optim.lr,
        "wall_seconds": seconds,
        "accuracy_curve": h.get("accuracy_curve", []),
        "teacher": t.teacher.label,
        "student": cfg.student,
        "task": cfg.task.name or cfg.task.path,
        "nonfinite_steps": t.nonfinite_total,
        "skipped_prompts": t.prompts.skipped,
        "truncated_prompts": t.prompts.truncated,
        "output_dir": str(t.out),
        "resumes": h.get("resumes", []),  # each resume's step and the settings it changed
    }

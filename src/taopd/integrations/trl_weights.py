"""`selection_mode="weight"` inside TRL's `DistillationTrainer`: the weighted loss and its metrics.

Used by `taopd.integrations.trl` (see its docstring); imports torch and taopd.core only, and
reaches TRL through the trainer it is handed (its `_get_last_hidden_state`,
`_forward_redirection`, `teacher_model`, `accelerator`, `beta`, `temperature`).

TRL's `_compute_loss` reduces an unweighted per-token divergence, so a weight cannot ride on its
loss mask. In weight mode the scoring pass puts each position's weight (and the student entropy
it measured, for TRL's `entropy` metric) into the batch as tensors, split by TRL with the rest;
`weighted_loss` then returns what TRL's `_compute_loss` returns, (loss, entropy sum, valid
count), with loss = Σ_t w_t ℓ_t / num_items_in_batch over TRL's loss mask (completion × tool
mask): TRL's normalization (the global valid count, divided by the process count as TRL's
`compute_loss` does), computed by taopd's `selective_head_loss`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from taopd.core.loss import selective_head_loss
from taopd.core.scores import HeadSpec, TokenSignals, normalize

__all__ = ["WEIGHT_KEY", "ENTROPY_KEY", "loss_kind", "weight_metrics", "weighted_loss"]

WEIGHT_KEY = "taopd_token_weights"  # the per-position weights [B, C] in a batch dict
ENTROPY_KEY = "taopd_student_entropy"  # the scoring pass's student entropy [B, C]


def loss_kind(beta: float) -> tuple[str, float]:
    """TRL's `beta` as taopd's loss kind: 1 → reverse KL, 0 → forward KL, else the generalized JSD
    with the same β. TRL 1.16's chunked divergence computes β·KL(p_T‖m) + (1 − β)·KL(p_S‖m) with
    m = β·p_T + (1 − β)·p_S, which is taopd's `jsd` (tests: weights of 1 give TRL's loss)."""
    beta = float(beta)
    if beta == 1.0:
        return "reverse_kl", 0.5
    if beta == 0.0:
        return "forward_kl", 0.5
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in [0, 1] (TRL's divergence), got {beta}")
    return "jsd", beta


def loss_mask(inputs: dict[str, Any]) -> Tensor:
    """TRL's loss mask of a batch: completion mask × tool mask, as bool."""
    valid = inputs["completion_mask"].bool()
    if "tool_mask" in inputs:
        valid = valid & inputs["tool_mask"].bool()
    return valid


def weighted_loss(
    trainer: Any,
    student: nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: Tensor | float | None,
    heads: tuple[HeadSpec, HeadSpec],
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's `_compute_loss` with the batch's token weights (see module): (loss, entropy sum
    detached, valid count). `student` is the unwrapped student, `heads` both models' HeadSpec."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].size(1)
    h_s = trainer._get_last_hidden_state(student, input_ids, attention_mask, width)
    trainer.teacher_model.eval()
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    with torch.no_grad():  # the cached hidden states of the scoring pass when they travel along
        h_t = trainer._forward_redirection(
            trainer.teacher_model, teacher, trainer._get_last_hidden_state, teacher, input_ids,
            attention_mask, width,
        )  # fmt: skip
    w_s = student.get_output_embeddings().weight
    w_t = teacher.get_output_embeddings().weight
    device = w_s.device
    valid = loss_mask(inputs).to(device)
    n_valid = valid.sum()
    if num_items_in_batch is None:  # TRL's own fallback: the mean over the local valid positions
        normalizer = float(max(int(n_valid), 1))
    else:
        normalizer = float(num_items_in_batch)
    kind, beta = loss_kind(trainer.beta)
    loss = selective_head_loss(
        h_s.to(device), w_s, valid, teacher_hidden=h_t.to(device), teacher_weight=w_t.to(device),
        kind=kind, beta=beta, temperature=trainer.temperature, normalizer=normalizer,
        chunk_size=chunk_size, student_head=heads[0], teacher_head=heads[1],
        token_weights=inputs[WEIGHT_KEY].to(device),
    )  # fmt: skip
    entropy = inputs[ENTROPY_KEY].to(device)
    entropy_sum = torch.where(valid, entropy, torch.zeros_like(entropy)).sum()
    return loss, entropy_sum.detach(), n_valid


def weight_metrics(sig: TokenSignals, valid: Tensor, weights: Tensor) -> dict[str, float]:
    """Weight mode's metrics over the global batch: every valid position kept, the weights' range,
    and the mean teachability / D / C / top-K overlap over all valid positions (`_all`) and
    weight-averaged (`_weighted`, Σ w·x / Σ w)."""
    n_valid = int(valid.sum())
    out = {"taopd/kept_share": 1.0 if n_valid else 0.0, "taopd/kept_positions": float(n_valid)}
    w = weights.double()[valid]
    if not n_valid or float(w.sum()) <= 0:
        return out
    out.update(
        {
            "taopd/weight_min": float(w.min()),
            "taopd/weight_max": float(w.max()),
            "taopd/weight_mean": float(w.mean()),
        }
    )
    values = {
        "teachability": normalize(sig.disagreement, valid) * normalize(sig.compatibility, valid),
        "disagreement": sig.disagreement,
        "compatibility": sig.compatibility,
        "topk_overlap": sig.overlap,
    }
    for name, x in values.items():
        xv = x[valid].double()
        out[f"taopd/{name}_all"] = float(xv.mean())
        out[f"taopd/{name}_weighted"] = float((xv * w).sum() / w.sum())
    return out

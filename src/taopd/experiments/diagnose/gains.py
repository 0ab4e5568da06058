"""Gains of an update on the bank's fixed contexts (Eq. 1): a short OPD run (`opd`), or one
SGD step per chosen position (`single-step`, with Proposition 1's first-order prediction)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...core.loss import per_token_loss, selective_head_loss
from ...core.scores import TokenSignals
from ...models import lm_head
from ...training.rollout import Rollout, response_hidden
from .bank import Models, score_bank

__all__ = [
    "REL_EPS",
    "opd_gains",
    "opd_update",
    "relative_gain",
    "single_step_gain",
    "single_step_gains",
]

REL_EPS = 1e-12  # relative gain (KL0 − KLτ) / (KL0 + REL_EPS), as released


def relative_gain(kl0: np.ndarray, kl_tau: np.ndarray) -> np.ndarray:
    """The released gain: the relative forward-KL reduction (KL0 − KLτ) / (KL0 + 1e-12)."""
    kl0 = np.asarray(kl0, dtype=float)
    return (kl0 - np.asarray(kl_tau, dtype=float)) / (kl0 + REL_EPS)


def _params(model: torch.nn.Module) -> list[Tensor]:
    return [q for q in model.parameters() if q.requires_grad]


@torch.no_grad()
def _sgd(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float) -> None:
    for q, g in zip(params, grads, strict=True):
        q.sub_(lr * g)


def single_step_gain(
    params: Sequence[Tensor],
    step_loss: Callable[[], Tensor],
    fixed_kl: Callable[[], Tensor],
    lr: float,
    kl0: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Per-position gain KL0 − KLτ of one SGD step θτ = θ0 − lr·∇`step_loss`; weights restored.

    `fixed_kl()` returns the per-position KL(p_T‖p_θ) of the current parameters on the fixed
    contexts (no grad needed); `kl0` is its value at θ0 (computed when None). Returns the gains
    and the gradient of `step_loss` (for a first-order comparison).
    """
    params = list(params)
    if kl0 is None:
        with torch.no_grad():
            kl0 = fixed_kl()
    saved = [q.detach().clone() for q in params]
    loss = step_loss()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(q) if g is None else g for q, g in zip(params, grads, strict=True)]
    try:
        _sgd(params, grads, lr)
        with torch.no_grad():
            kl_tau = fixed_kl()
    finally:
        with torch.no_grad():
            for q, s in zip(params, saved, strict=True):
                q.copy_(s)
    return kl0 - kl_tau, grads


def _fixed_kl_grad(
    models: Models,
    bank: Rollout,
    teacher_cache: list[Tensor],
    batch_size: int,
    loss_chunk_size: int,
    progress: bool,
) -> list[Tensor]:
    """∇ L_fix = ∇ mean_t KL(p_T‖p_θ)(c_t) over the bank's valid positions (selective head)."""
    student = models.student
    device = next(student.parameters()).device
    params = _params(student)
    p = bank.prompt_len
    n_valid = float(bank.response_mask[:, p:].sum())
    w_s, w_t = lm_head(student), lm_head(models.teacher)
    student.zero_grad(set_to_none=True)
    starts = list(range(0, len(bank), batch_size))
    for j, i in enumerate(
        tqdm(starts, desc="single-step: ∇L_fix", disable=not progress, leave=False)
    ):
        sub = bank.rows(slice(i, i + batch_size)).to(device)
        valid = sub.response_mask[:, p:]
        if not bool(valid.any()):
            continue
        h = response_hidden(student, sub)
        loss = selective_head_loss(
            h,
            w_s,
            valid,
            teacher_hidden=teacher_cache[j].to(device),
            teacher_weight=w_t,
            kind="forward_kl",
            normalizer=n_valid,
            vocab_size=models.vocab_size,
            chunk_size=loss_chunk_size,
        )
        loss.backward()
    grads = [torch.zeros_like(q) if q.grad is None else q.grad.detach().clone() for q in params]
    student.zero_grad(set_to_none=True)
    return grads


def _sampled_positions(valid: Tensor, seed: int, n_single: int) -> Tensor:
    """`n_single` seeded random valid positions of the bank (0: all), as sorted flat indices."""
    flat = valid.reshape(-1).nonzero().squeeze(-1)
    gen = torch.Generator().manual_seed(seed)
    n = flat.numel() if n_single == 0 else min(n_single, flat.numel())
    return flat[torch.randperm(flat.numel(), generator=gen)[:n]].sort().values


def _record_gain(
    out: dict[str, np.ndarray],
    at: tuple[int, int],
    gains_valid: Tensor,
    gain_self: float,
    grads: Any,
    g_fix: Any,
    l0: float,
    dcfg: Any,
) -> None:
    """Write position `at`'s gains (absolute, relative, on itself) and the first-order
    prediction lr * <∇L_fix, ∇ℓ_t> into `out`."""
    g_mean = float(gains_valid.mean())
    lt = l0 - g_mean
    out["gain_absolute"][at] = g_mean
    out["gain_relative"][at] = (l0 - lt) / (l0 + REL_EPS)
    out["gain_self"][at] = gain_self
    dot = sum(float((gf.double() * g.double()).sum()) for gf, g in zip(g_fix, grads, strict=True))
    out["first_order"][at] = dcfg.single_lr * dot


def single_step_gains(
    models: Models,
    bank: Rollout,
    sig0: TokenSignals,
    teacher_cache: list[Tensor],
    dcfg: Any,
    chunk_sizes: tuple[int, int],
    progress: bool,
) -> dict[str, np.ndarray]:
    """Gains of one SGD step on each of `n_single` random valid positions (see the package
    doc). `chunk_sizes`: (selection.chunk_size for scoring, loss.chunk_size for ∇L_fix)."""
    student, vocab = models.student, models.vocab_size
    device = next(student.parameters()).device
    p = bank.prompt_len
    valid = bank.response_mask[:, p:]
    chosen = _sampled_positions(valid, dcfg.seed, dcfg.n_single)
    width = valid.shape[1]
    kl0 = sig0.forward_kl
    shape = tuple(valid.shape)
    out = {
        name: np.full(shape, np.nan)
        for name in ("gain", "gain_absolute", "gain_relative", "gain_self", "first_order")
    }
    student.eval()  # deterministic forward (no dropout) for the step and the measurements
    params = _params(student)
    g_fix = _fixed_kl_grad(models, bank, teacher_cache, dcfg.batch_size, chunk_sizes[1], progress)
    w_s, w_t = lm_head(student), lm_head(models.teacher)
    l0 = float(kl0[valid].mean())

    def fixed_kl() -> Tensor:
        sig = score_bank(
            student,
            models.teacher,
            bank,
            vocab,
            k=1,
            batch_size=dcfg.batch_size,
            chunk_size=chunk_sizes[0],
            teacher_cache=teacher_cache,
            progress=False,
        )
        return sig.forward_kl

    bs = dcfg.batch_size
    for flat_idx in tqdm(chosen.tolist(), desc="single-step updates", disable=not progress):
        b, j = divmod(flat_idx, width)
        row = bank.rows(slice(b, b + 1)).to(device)
        h_t = teacher_cache[b // bs][b % bs, j].to(device)

        def step_loss(row: Rollout = row, j: int = j, h_t: Tensor = h_t) -> Tensor:
            h = response_hidden(student, row)[0, j]
            s_logits = (h @ w_s[:vocab].T).unsqueeze(0)
            t_logits = (h_t @ w_t[:vocab].T.to(h_t.dtype)).unsqueeze(0)
            return per_token_loss(s_logits, t_logits, "reverse_kl").sum()

        gains, grads = single_step_gain(params, step_loss, fixed_kl, dcfg.single_lr, kl0=kl0)
        _record_gain(out, (b, j), gains[valid], float(gains[b, j]), grads, g_fix, l0, dcfg)
    key = "gain_relative" if dcfg.relative else "gain_absolute"
    out["gain"] = out[key].copy()
    return out


def opd_update(trainer: Any, progress: bool) -> dict[str, Any]:
    """A short OPD run with the trainer's own step (no evaluation); θτ stays in `trainer`."""
    steps = trainer.cfg.train.steps
    t0 = time.perf_counter()
    bar = tqdm(
        total=steps, desc=f"OPD update ({trainer.cfg.selection.strategy})", disable=not progress
    )
    last: dict[str, Any] = {}
    while trainer.step < steps:
        metrics = trainer.train_step()
        if metrics is not None:
            trainer.log(metrics)
            last = metrics
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", kept=metrics["n_selected"])
        bar.update(1)
    bar.close()
    return {
        "update_steps": trainer.step,
        "update_strategy": trainer.cfg.selection.strategy,
        "update_ratio": trainer.cfg.selection.ratio,
        "update_lr": trainer.cfg.optim.lr,
        "update_batch_size": trainer.cfg.train.batch_size,
        "update_tokens_trained": trainer.tokens_trained,
        "update_last_loss": last.get("loss"),
        "update_seconds": time.perf_counter() - t0,
    }


def opd_gains(kl0: np.ndarray, kl_tau: np.ndarray, relative: bool) -> dict[str, np.ndarray]:
    """Per-position gains of an OPD update: absolute KL0 − KLτ (Eq. 1) and relative."""
    g_abs = kl0 - kl_tau
    g_rel = relative_gain(kl0, kl_tau)
    return {
        "kl_tau": kl_tau,
        "gain": g_rel if relative else g_abs,
        "gain_absolute": g_abs,
        "gain_relative": g_rel,
    }

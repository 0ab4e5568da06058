"""How the student is held across processes: the interface a training step uses, and the
replicated engine (a whole copy on every process; gradients summed by all-reduce).

The step never asks which engine it has: it takes the whole weights for a step (`whole`), runs
passes with gradient (`forward`), backpropagates each micro-batch's share of the globally
normalized loss (`backward`) and applies the update (`step`). Checkpoints hold whole weights and
optimizer state whatever the engine (`full_state` / `load_state`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..checkpoint import load_student_weights
from ..collectives import Group

if TYPE_CHECKING:
    from ...config import Config

__all__ = ["ReplicatedEngine", "StudentEngine", "make_optimizer", "make_scheduler"]


def make_optimizer(
    student: nn.Module, lr: float, weight_decay: float, betas: Any
) -> torch.optim.Optimizer:
    """AdamW over the student's trainable parameters (its shards, once sharded)."""
    params = [p for p in student.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def make_scheduler(opt: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """optim.scheduler over train.steps: linear warmup, then constant, linear or cosine."""
    total, warm, kind = cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.scheduler

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - frac if kind == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class StudentEngine:
    """The student, its optimizer, and how both are split over the processes of `group`."""

    name = "replicated"  # summary.json / error messages
    optimizer_format = "replicated"  # how checkpoints hold the optimizer state

    def __init__(self, student: nn.Module, opt: torch.optim.Optimizer, group: Group) -> None:
        self.student = student
        self.opt = opt
        self.group = group

    @contextlib.contextmanager
    def whole(self) -> Iterator[None]:
        """Full student weights on every process for the block (a no-op when replicated)."""
        yield

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        """`fn(student)` for a pass with gradient."""
        return fn(self.student)

    def backward(self, loss: Tensor, last: bool) -> None:
        """Backward of one micro-batch's share of the globally normalized loss."""
        loss.backward()

    def step(self, loss_value: float, grad_clip: float) -> tuple[float, bool]:
        """Sum gradients over ranks, check and clip them, step unless non-finite; zero them.

        Returns the gradient norm and whether the update was applied."""
        grad_norm, finite = self._reduce_and_clip(loss_value, grad_clip)
        if finite:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm, finite

    def _reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """All-reduce (sum) the gradients: the loss is already normalized by the global count."""
        if self.group.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)

    def _reduce_and_clip(self, loss_value: float, grad_clip: float) -> tuple[float, bool]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        self._reduce_gradients(params)
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # sharded gradients: the norm over all shards
            norm = norm.full_tensor()
        finite = (
            bool(torch.isfinite(norm))
            and math.isfinite(self.group.all_reduce_sum(loss_value))
            and bool(grads)
        )
        return float(norm), finite

    def full_state(self) -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
        """Whole weights (None: the model's own state dict) and optimizer state for a checkpoint.

        A collective for sharded engines (every rank calls it; rank 0 receives the state)."""
        return None, self.opt.state_dict()

    def load_state(self, ckpt: Path, optimizer_state: dict[str, Any], lora: bool) -> None:
        """Resume: the checkpoint's weights (sharded engines load them before sharding) and
        optimizer state."""
        load_student_weights(self.student, ckpt, lora)
        self.opt.load_state_dict(optimizer_state)


class ReplicatedEngine(StudentEngine):
    """A whole student on every process; gradients all-reduced before the step."""

"""Student engines: replicated (base.py), FSDP2 (fsdp.py), DeepSpeed ZeRO (zero.py).

`make_engine` picks one at setup; the training step only calls the `StudentEngine` interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..checkpoint import load_student_weights
from ..collectives import Group
from .base import ReplicatedEngine, StudentEngine, make_optimizer

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["ENGINES", "ReplicatedEngine", "StudentEngine", "make_engine"]

ENGINES = ("replicated", "fsdp", "deepspeed")


def make_engine(
    kind: str, student: nn.Module, group: Group, cfg: Config, resume_from: Path | None
) -> StudentEngine:
    """The student engine `kind` over `student`, with its AdamW (optim.*).

    Sharded engines take a checkpoint's whole weights before sharding (`resume_from`); the
    replicated one loads them with its optimizer state (`StudentEngine.load_state`).
    """
    o = cfg.optim

    def optimizer() -> torch.optim.Optimizer:
        return make_optimizer(student, o.lr, o.weight_decay, o.betas)

    if kind == "replicated":
        return ReplicatedEngine(student, optimizer(), group)
    if resume_from is not None:  # whole weights go in before sharding
        load_student_weights(student, resume_from, cfg.lora is not None)
    if kind == "fsdp":
        from .fsdp import FSDPEngine, shard_student

        units = shard_student(student, group.device)  # the optimizer sees the shards
        return FSDPEngine(student, optimizer(), group, units)
    from .zero import ZeroEngine, deepspeed_config, init_engine

    opt = optimizer()  # DeepSpeed partitions the student; `opt` then steps the partitions
    ds = init_engine(student, opt, deepspeed_config(group.world, o.grad_clip, cfg.train.dtype))
    return ZeroEngine(student, opt, group, ds)

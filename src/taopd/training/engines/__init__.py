"""Student engines: replicated (base.py), FSDP2 (fsdp.py), DeepSpeed ZeRO (zero.py).

`make_engine` picks one at setup; the training step only calls the `StudentEngine` interface.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...errors import UserError
from ..checkpoint import load_student_weights
from ..collectives import Group
from .base import ReplicatedEngine, StudentEngine, make_optimizer, make_scheduler

if TYPE_CHECKING:
    from ...config import Config

__all__ = [
    "ENGINES",
    "ReplicatedEngine",
    "StudentEngine",
    "engine_kind",
    "make_engine",
    "make_scheduler",
    "optimizer_format",
]

ENGINES = ("replicated", "fsdp", "deepspeed")


def engine_kind(cfg: Config, acc: Any) -> str:
    """replicated, fsdp or deepspeed: from the config or accelerate launch's settings."""
    env = os.environ  # accelerate launch's config (CPU runs report it as MULTI_CPU)
    launched = str(getattr(acc, "distributed_type", "")).upper()
    deepspeed = cfg.train.deepspeed or "DEEPSPEED" in launched
    deepspeed = deepspeed or env.get("ACCELERATE_USE_DEEPSPEED") == "true"
    fsdp = cfg.train.fsdp or "FSDP" in launched or env.get("ACCELERATE_USE_FSDP") == "true"
    world = acc.num_processes
    for name, on in (("fsdp", fsdp), ("deepspeed", deepspeed)):
        if on and world == 1:
            raise UserError(
                f"train.{name} shards across processes: launch 2 or more with accelerate"
            )
        if on and cfg.lora is not None:
            raise UserError(f"lora with {name} is not supported: use one or the other")
    if fsdp and deepspeed:
        raise UserError("train.fsdp and DeepSpeed both shard the student: choose one")
    return "fsdp" if fsdp else "deepspeed" if deepspeed else "replicated"


def optimizer_format(kind: str) -> str:
    """How an engine of `kind` holds the optimizer state in its checkpoints (a resume needs the
    same): the `optimizer_format` of its class."""
    if kind == "fsdp":
        from .fsdp import FSDPEngine

        return FSDPEngine.optimizer_format
    if kind == "deepspeed":
        from .zero import ZeroEngine

        return ZeroEngine.optimizer_format
    return ReplicatedEngine.optimizer_format


def make_engine(
    kind: str, student: nn.Module, group: Group, cfg: Config, resume_from: Path | None
) -> StudentEngine:
    """The student engine `kind` over `student`, with its AdamW (optim.*).

    Sharded engines take a checkpoint's whole weights before sharding (`resume_from`); the
    replicated one loads them with its optimizer state (`StudentEngine.load_state`).
    """
    if kind not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {kind!r}")
    o = cfg.optim

    def optimizer() -> torch.optim.Optimizer:
        return make_optimizer(student, o.lr, o.weight_decay, o.betas)

    if kind == "replicated":
        return ReplicatedEngine(student, optimizer(), group)
    if resume_from is not None and kind == "deepspeed":
        from .zero import check_resumable

        check_resumable(student, group.world)
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

"""The FSDP2 engine: the student sharded across processes, shaped for the selective head.

The trainer calls the student's body and its lm_head weight directly (scoring and the selective
loss never run the model's own forward), so FSDP's per-forward gathering alone is not enough.
Each step gathers the full weights on every process (`gather`), computes as on one process, and
the backward pass reduce-scatters gradients back into shards: weights are whole only during a
step, while gradients between steps and the optimizer state (2/3 of Adam's memory) stay sharded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UserError
from ..collectives import Group
from .base import StudentEngine

__all__ = [
    "FSDPEngine",
    "decoder_layers",
    "full_model_state",
    "full_optimizer_state",
    "gather",
    "release",
    "set_full_optimizer_state",
    "shard_student",
]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks (the largest ModuleList), one FSDP unit each."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise UserError(f"fsdp: found no decoder layers in {type(model).__name__}")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def shard_student(model: nn.Module, device: torch.device) -> list[Any]:
    """Shard `model` in place (each decoder layer, then the rest); return the FSDP modules.

    Gradients are summed over processes, not averaged: the loss is already normalized by the
    global number of selected tokens.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise UserError("train.fsdp needs several processes: start taopd with `accelerate launch`")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    units: list[Any] = []
    for layer in decoder_layers(model):
        units.append(fully_shard(layer, mesh=mesh, reshard_after_forward=False))
    units.append(fully_shard(model, mesh=mesh, reshard_after_forward=False))
    for u in units:
        u.set_gradient_divide_factor(1.0)
        u.set_force_sum_reduction_for_comms(True)  # plain sums (gloo has no pre-scaled sum)
    return units


def gather(units: list[Any]) -> None:
    """Make every unit's full weights present on this process (a collective: all ranks call it).

    They stay whole until the next backward pass (which reduce-scatters and reshards each unit)
    or `release`.
    """
    for u in units:
        u.unshard()


def release(units: list[Any]) -> None:
    """Drop the gathered full weights, keeping this process's shards."""
    for u in units:
        u.reshard()


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole student state dict on rank 0 (empty elsewhere); all ranks must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state (keyed by parameter name) on rank 0; all ranks must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_options())


def set_full_optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a state written by `full_optimizer_state` into this process's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )


class FSDPEngine(StudentEngine):
    """FSDP2: whole weights gathered for a step, gradients reduce-scattered by the backward,
    optimizer state sharded; checkpoints hold the whole state (rank 0)."""

    name = "fsdp"
    optimizer_format = "fsdp-full"

    def __init__(
        self, student: nn.Module, opt: torch.optim.Optimizer, group: Group, units: list[Any]
    ) -> None:
        super().__init__(student, opt, group)
        self.units = units
        self._resharded = False  # a backward pass resharded the weights inside `whole`

    @contextlib.contextmanager
    def whole(self) -> Iterator[None]:
        gather(self.units)
        self._resharded = False
        try:
            yield
        finally:
            release(self.units)

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        if self._resharded:  # the previous micro-batch's backward resharded the weights
            gather(self.units)
            self._resharded = False
        return fn(self.student)

    def backward(self, loss: Tensor, last: bool) -> None:
        loss.backward()
        self._resharded = True

    def _reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Nothing to do: FSDP reduce-scatters (sums) the gradients in the backward."""

    def full_state(self) -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
        return full_model_state(self.student), full_optimizer_state(self.student, self.opt)

    def load_state(self, ckpt: Path, optimizer_state: dict[str, Any], lora: bool) -> None:
        set_full_optimizer_state(self.student, self.opt, optimizer_state)

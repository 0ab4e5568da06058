"""The DeepSpeed ZeRO engine for the student, shaped like the FSDP one: whole weights for a step.

The selective head reads the body and the lm_head weight outside the model's own forward, so
ZeRO-3's per-module gathering would see half of the step (and rank-dependent generation lengths
would misalign its collectives). taopd therefore removes ZeRO-3's module hooks and gathers every
student weight for a step (`whole`); the backward pass still reduce-scatters the gradients into
the partitions through DeepSpeed's gradient hooks, and the optimizer state stays partitioned.
API checked against deepspeed 0.19.8 (the hook lists removed here are DeepSpeed internals).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UserError
from ..collectives import Group
from .base import StudentEngine

__all__ = [
    "ZeroEngine",
    "StudentCall",
    "check_resumable",
    "deepspeed_config",
    "full_model_state",
    "full_optimizer_state",
    "init_engine",
    "set_full_optimizer_state",
    "whole",
]

# accelerate launch exports its DeepSpeed settings as these variables (deepspeed_config: ...)
_ENV = "ACCELERATE_DEEPSPEED_"
# what taopd sets itself: it runs its own micro-batches and clipping (from the taopd config)
_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError:
        raise UserError(
            "DeepSpeed training needs the deepspeed package: install torch first, then "
            "pip install --no-build-isolation 'taopd[deepspeed]'"
        ) from None
    return deepspeed


def deepspeed_config(
    world: int, grad_clip: float, dtype: str, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The DeepSpeed config for a launch: accelerate's settings (a JSON file or the zero_stage /
    offload keys), with batch sizes, clipping and precision taken from the taopd config."""
    env = os.environ if env is None else env
    config: dict[str, Any] = {}
    file = env.get(_ENV + "CONFIG_FILE")
    if file:
        try:
            config = json.loads(Path(file).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"deepspeed_config_file {file}: {e}") from None
    zero = dict(config.get("zero_optimization", {}))
    zero.setdefault("stage", int(env.get(_ENV + "ZERO_STAGE", "3")))
    for kind in ("optimizer", "param"):
        device = env.get(f"{_ENV}OFFLOAD_{kind.upper()}_DEVICE", "none")
        if device not in ("", "none"):
            zero.setdefault(f"offload_{kind}", {"device": device})
    # taopd gathers the whole student itself: no per-module prefetching, every weight partitioned
    zero = {k: v for k, v in zero.items() if v != "auto"}
    zero.setdefault("stage3_prefetch_bucket_size", 0)
    zero.setdefault("stage3_param_persistence_threshold", 0)
    if zero["stage"] not in (2, 3):
        raise UserError(
            f"DeepSpeed ZeRO stage {zero['stage']}: taopd supports stages 2 and 3 "
            "(set zero_stage in the accelerate config)"
        )
    config = {k: v for k, v in config.items() if k not in _OWNED and v != "auto"}
    config.update(
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,
        train_batch_size=world,
        gradient_clipping=grad_clip,
        zero_optimization=zero,
        bf16={"enabled": dtype == "bfloat16"},
        fp16={"enabled": dtype == "float16"},
        zero_allow_untested_optimizer=True,  # taopd's torch AdamW
        zero_force_ds_cpu_optimizer=False,
        steps_per_print=2**31 - 1,
    )
    return config


def check_resumable(student: nn.Module, world: int) -> None:
    """Refuse, before any work, a ZeRO resume DeepSpeed 0.19 cannot load: its safe_set_full_*
    cannot set the optimizer state of a parameter whose size `world` does not divide."""
    for name, p in student.named_parameters():
        if p.requires_grad and p.numel() % world:
            raise UserError(
                f"DeepSpeed cannot resume this checkpoint on {world} processes: parameter {name} "
                f"has {p.numel()} elements, not divisible by {world} (a DeepSpeed 0.19 limit); "
                "resume on a process count that divides every parameter size, or with train.fsdp"
            )


class StudentCall(nn.Module):
    """Runs `fn(student)` as one module call: the DeepSpeed engine's forward takes callables."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        return fn(self.student)


def init_engine(student: nn.Module, opt: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
    """The DeepSpeed engine over `student` (through StudentCall) and `opt`, module hooks removed."""
    deepspeed = _deepspeed()
    if not torch.distributed.is_initialized():
        raise UserError("DeepSpeed needs several processes: start taopd with `accelerate launch`")
    engine, *_ = deepspeed.initialize(model=StudentCall(student), optimizer=opt, config=config)
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is not None:  # ZeRO-3: taopd gathers whole weights itself (see `whole`)
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
    return engine


def _zero3(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def whole(model: nn.Module) -> Iterator[None]:
    """Every weight of `model` whole on this process for the block (a collective for ZeRO-3)."""
    if not _zero3(model):
        yield
        return
    with _deepspeed().zero.GatheredParameters(list(model.parameters())):
        yield


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole student state dict on rank 0, on CPU (empty elsewhere); all ranks must call it."""
    rank0 = torch.distributed.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    with whole(model):
        if rank0:
            copies: dict[int, torch.Tensor] = {}  # tied weights (one storage) stay one tensor
            for k, v in model.state_dict().items():
                out[k] = copies.setdefault(v.data_ptr(), v.detach().cpu().clone())
    return out


_KEYS = ("exp_avg", "exp_avg_sq")


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW's moments and fp32 master weights per parameter name, whole on rank 0.

    All ranks must call it; the format does not depend on the number of processes.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    steps = [s["step"] for s in opt.state.values() if "step" in s]
    rank0 = torch.distributed.get_rank() == 0
    state: dict[str, Any] = {"step": float(steps[0]) if steps else 0.0, "params": {}}
    if not steps:  # no optimizer step applied yet: nothing to keep
        return state if rank0 else {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        entry = {k: safe_get_full_optimizer_state(p, k) for k in _KEYS}
        entry["master"] = safe_get_full_fp32_param(p)
        if rank0:
            state["params"][name] = {k: v.detach().cpu().reshape(-1) for k, v in entry.items()}
    return state if rank0 else {}


def set_full_optimizer_state(
    model: nn.Module, engine: Any, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a state written by `full_optimizer_state` into this process's partitions."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not state.get("params"):
        return
    # AdamW makes its moments at the first step: create them on the fp32 partitions now
    zopt = engine.optimizer
    flats = getattr(zopt, "fp32_partitioned_groups_flat", None)  # stage 3
    if flats is None:  # stage 2
        flats = list(zopt.single_partition_of_fp32_groups)
    for f in flats:
        opt.state[f] = {
            "step": torch.tensor(state["step"]),
            **{k: torch.zeros_like(f) for k in _KEYS},
        }
    params = dict(model.named_parameters())
    missing = sorted(set(state["params"]) - set(params))
    if missing:
        raise UserError(f"the checkpoint's optimizer state names unknown parameters: {missing[:3]}")
    for name, entry in state["params"].items():
        p, device = params[name], flats[0].device
        for k in _KEYS:
            safe_set_full_optimizer_state(p, entry[k].to(device), k)
        safe_set_full_fp32_param(p, entry["master"].to(device))


class ZeroEngine(StudentEngine):
    """DeepSpeed ZeRO-2/3: whole weights for a step (ZeRO-3 gathers them), gradients
    reduce-scattered by DeepSpeed, which also clips and skips non-finite steps."""

    name = "deepspeed"
    optimizer_format = "deepspeed-full"

    def __init__(
        self, student: nn.Module, opt: torch.optim.Optimizer, group: Group, engine: Any
    ) -> None:
        super().__init__(student, opt, group)
        self.engine = engine  # DeepSpeed's engine over StudentCall(student)

    def whole(self) -> contextlib.AbstractContextManager[None]:
        return whole(self.student)

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        return self.engine(fn)

    def backward(self, loss: Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        # DeepSpeed averages gradients over processes; taopd's loss wants them summed
        self.engine.backward(loss * self.group.world, scale_wrt_gas=False)

    def step(self, loss_value: float, grad_clip: float) -> tuple[float, bool]:
        self.engine.step()  # clips (gradient_clipping = optim.grad_clip) and zeroes
        norm = float(self.engine.get_global_grad_norm() or 0.0)
        finite = self.engine.was_step_applied() and math.isfinite(
            self.group.all_reduce_sum(loss_value)
        )
        return norm, finite and math.isfinite(norm)

    def full_state(self) -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
        return full_model_state(self.student), full_optimizer_state(self.student, self.opt)

    def load_state(self, ckpt: Path, optimizer_state: dict[str, Any], lora: bool) -> None:
        set_full_optimizer_state(self.student, self.engine, self.opt, optimizer_state)

"""The training processes as one group: rank, world size and the few collectives a step needs.

On one process every collective is the identity, so the step reads the same for any world size.
Ranks may hold different numbers of rollout rows (prompts skipped for length): row gathers pad
to the longest shape and cut the padding off again.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import Tensor

__all__ = ["Group", "leave_process_group"]


def leave_process_group() -> None:
    """End this process of a multi-process run: a barrier, the process group torn down, exit 0.

    Call it only once everything is saved. DeepSpeed keeps its engine and process groups alive
    past `destroy_process_group` (module globals and hook closures), so their gloo threads still
    run when the interpreter shuts down; the C++ teardown that follows can then abort the process
    (SIGABRT, "terminate called without an active exception") and turn a finished run into a
    failed launch. The process therefore ends without that shutdown (`os._exit`).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # also drops DeepSpeed's own references to the groups
    else:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Group:
    """This process's place among the training processes (an accelerate `Accelerator`)."""

    def __init__(self, acc: Any) -> None:
        self.acc = acc
        self.rank: int = acc.process_index
        self.world: int = acc.num_processes
        self.device: torch.device = acc.device

    @property
    def is_main(self) -> bool:
        return bool(self.acc.is_main_process)

    def wait(self) -> None:
        """A barrier: every process reaches this line before any goes on."""
        self.acc.wait_for_everyone()

    def all_reduce_sum(self, value: float) -> float:
        """`value` summed over all processes (float64), returned on every process."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64)
        return float(self.acc.reduce(t, reduction="sum"))

    def all_reduce_max(self, value: int) -> int:
        """The largest `value` over all processes."""
        if self.world == 1:
            return value
        n = torch.tensor([value], device=self.device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        return int(n)

    def sum_counts(self, *counts: int) -> tuple[int, ...]:
        """Integer counts each summed over all processes (one collective)."""
        if self.world == 1:
            return counts
        t = torch.tensor(list(counts), device=self.device)
        return tuple(int(x) for x in self.acc.reduce(t, reduction="sum"))

    def row_shapes(self, x: Tensor) -> list[tuple[int, int]]:
        """Every rank's [b, T] of a per-position tensor, in rank order."""
        if self.world == 1:
            return [(x.shape[0], x.shape[1])]
        shape = torch.tensor([x.shape[0], x.shape[1]], device=x.device)
        return [(int(b), int(t)) for b, t in self.acc.gather(shape).view(-1, 2).tolist()]

    def gather_rows(self, x: Tensor, fill: float | bool, shapes: list[tuple[int, int]]) -> Tensor:
        """All ranks' rows of a per-position [b, T] tensor (`shapes`: `row_shapes`), in rank
        order, padded to the longest T."""
        if self.world == 1:
            return x
        b_max, t_max = max(b for b, _ in shapes), max(t for _, t in shapes)
        padded = torch.full((b_max, t_max), fill, dtype=x.dtype, device=x.device)
        padded[: x.shape[0], : x.shape[1]] = x
        g = self.acc.gather(padded)
        return torch.cat([g[r * b_max : r * b_max + b] for r, (b, _) in enumerate(shapes)])

    def first_row(self, shapes: list[tuple[int, int]]) -> int:
        """This rank's first row in a gather of `shapes`."""
        return sum(b for b, _ in shapes[: self.rank])

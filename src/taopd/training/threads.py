"""torch's CPU threads for a run: the cores other jobs leave free (train and eval share it)."""

from __future__ import annotations

import math
import os

import torch

__all__ = ["free_cores", "set_threads"]


def free_cores() -> int:
    """CPU cores this process may use that other processes are not busy on, at least 1.

    The cores it may run on (its affinity mask) minus the 1-minute load average, rounded: with
    as many OpenMP threads as cores on a machine where another job holds one, every parallel
    region waits for the thread that shares a core (issue #17: the demo's ~4 s teacher fine-tune
    step took 19-39 s beside one 1-thread job on 2 cores; benchmarks/README.md, "Threads").
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, (cores or 1) - math.floor(busy + 0.5))


def set_threads(threads: int | None, device: torch.device) -> int:
    """torch's intra-op threads for a run: `train.threads` when set, else on CPU the free cores
    (`free_cores`, never more than torch's default), else torch's default. Returns the count."""
    if threads is None and device.type == "cpu":
        threads = min(torch.get_num_threads(), free_cores())
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()

"""Is a config sized for the CPU it starts on? A rough time of one training step from the config
and the models' parameter counts, and a loud warning before a GPU-sized recipe runs on a CPU
(issue 33: the Qwen recipe with a 135M pair took 425 s for its first CPU step).

The estimate counts matmul FLOPs: the rollouts (2 per student parameter per new token), the
teacher's forward (2 per parameter per token) and the student's forward and backward (6 per
parameter per token) over batch × (prompt + new) tokens, at this CPU's fp32 matmul rate measured
when the run starts. On the 2-core machine the demo (16 × 6 tokens, a 135M pair: ~0.8 TFLOP)
measured ~8 s a step against ~12 s estimated; the CPU recipes estimate under a minute, the GPU
recipes hours.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..config import Config

__all__ = ["cpu_matmul_flops", "gpu_sized_warning", "param_count", "step_flops", "WARN_S"]

WARN_S = 120.0  # an estimated CPU step longer than this is warned about


def param_count(model: Any) -> int:
    """Parameters of a model (or its meta-device skeleton); 0 for None (a served teacher)."""
    return 0 if model is None else sum(p.numel() for p in model.parameters())


def step_flops(
    cfg: Config, student_params: int, teacher_params: int, prompt_tokens: float
) -> float:
    """Matmul FLOPs of one training step of `cfg` (see the module's note)."""
    batch, new = cfg.train.batch_size, cfg.rollout.max_new_tokens
    tokens = batch * (prompt_tokens + new)
    return 2 * student_params * batch * new + tokens * (2 * teacher_params + 6 * student_params)


def cpu_matmul_flops() -> float:
    """This CPU's fp32 matmul rate in FLOP/s, measured in ~50 ms (no random numbers drawn)."""
    a, b = torch.full((512, 1024), 0.5), torch.full((1024, 1024), 0.5)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < 0.05 or n < 3:
        a @ b
        n += 1
    return n * 2 * 512 * 1024 * 1024 / elapsed


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def gpu_sized_warning(
    cfg: Config, student_params: int, teacher_params: int, prompt_tokens: float, flops: float
) -> str | None:
    """The warning for a config whose step would take over `WARN_S` on a CPU doing `flops`
    matmul FLOP/s; None when it is CPU-sized."""
    work = step_flops(cfg, student_params, teacher_params, prompt_tokens)
    seconds = work / flops
    if seconds <= WARN_S:
        return None
    teacher = (
        f"a {_human(teacher_params)}-parameter teacher" if teacher_params else "a served teacher"
    )
    return (
        f"warning: this config is GPU-sized and runs on a CPU: batch {cfg.train.batch_size} × "
        f"{cfg.rollout.max_new_tokens} new tokens (+ ~{prompt_tokens:.0f} prompt tokens) with "
        f"a {_human(student_params)}-parameter student and {teacher} is ~{_human(work, 'FLOP')} "
        f"a step; on this CPU (~{_human(flops, 'FLOP/s')} fp32 matmul) a step may take "
        f"~{_duration(seconds)}, {cfg.train.steps} steps ~{_duration(seconds * cfg.train.steps)}. "
        "For a first run on a CPU lower train.batch_size and rollout.max_new_tokens (the demo: "
        "16 × 6 with a 135M pair), or run on a GPU"
    )

"""Every seed a run derives from its one train.seed (and diagnose.seed), in one place.

Each use gets its own stream, so changing one (e.g. the number of processes) leaves the others.
"""

from __future__ import annotations

__all__ = ["bank_batch", "epoch_order", "heldout_bank", "per_prompt", "rollout", "selection"]

_MIX = 1_000_003  # a prime: distinct (seed, step) pairs give distinct seeds in practice


def rollout(seed: int, step: int, rank: int) -> int:
    """The student's sampling in `step` on process `rank`."""
    return seed * _MIX + step * 101 + rank


def selection(seed: int, step: int) -> int:
    """Random tie-breaking and the random strategy in `step` (the same on every process)."""
    return seed * _MIX + step


def epoch_order(seed: int, epoch: int) -> int:
    """The shuffle of the train split for `epoch`."""
    return seed * 7919 + epoch


def heldout_bank(seed: int) -> int:
    """The held-out KL bank's rollouts, sampled once from the initial student."""
    return seed + 12345


def bank_batch(seed: int, first_row: int) -> int:
    """The diagnostic bank's rollouts from `first_row` on (diagnose.seed)."""
    return seed * _MIX + first_row


def per_prompt(seed: int, i: int) -> int:
    """The vLLM sampler's seed of the i-th prompt of a call seeded `seed`."""
    return seed * _MIX + i

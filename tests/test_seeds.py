"""seeds.py: derived seeds stay what earlier runs used (resumed and compared runs rely on it)."""

from taopd import seeds


def test_derived_seeds_are_pinned():
    assert seeds.rollout(3, 5, 1) == 3 * 1_000_003 + 5 * 101 + 1
    assert seeds.selection(3, 5) == 3 * 1_000_003 + 5
    assert seeds.epoch_order(3, 2) == 3 * 7919 + 2
    assert seeds.heldout_bank(3) == 3 + 12345
    assert seeds.bank_batch(3, 10) == seeds.per_prompt(3, 10) == 3 * 1_000_003 + 10


def test_streams_differ():
    """Rollouts of two ranks, or of two steps, never share a seed; nor does selection."""
    pairs = {(step, rank) for step in range(1, 50) for rank in range(8)}
    assert len({seeds.rollout(0, s, r) for s, r in pairs}) == len(pairs)
    assert seeds.selection(0, 1) != seeds.rollout(0, 1, 0)

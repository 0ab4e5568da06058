import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taopd
from taopd.core.selection import STRATEGIES
from tests import reference as ref


def random_signals(shape=(4, 25), vocab=80, seed=0, k=8):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, vocab, generator=g) * 2
    t = torch.randn(*shape, vocab, generator=g) * 2
    return taopd.token_signals(s, t, k=k)


def test_top_n_of_whole_batch_with_ceil():
    scores = torch.arange(40, dtype=torch.float32).reshape(4, 10)
    valid = torch.ones(4, 10, dtype=torch.bool)
    valid[3] = False  # 30 valid positions
    mask = taopd.select(scores, valid, ratio=0.1)
    assert int(mask.sum()) == 3  # ceil(0.1 * 30)
    assert mask[2, 7:].all() and not mask[3].any()  # the largest valid scores, batch-wide
    assert int(taopd.select(scores, valid, ratio=0.11).sum()) == 4  # ceil(3.3)


def test_float_noise_does_not_add_a_position():
    scores = torch.rand(100)
    assert int(taopd.select(scores, ratio=0.05).sum()) == 5
    assert int(taopd.select(scores, ratio=0.07).sum()) == 7
    assert taopd.count_for(0.29, 100) == 29


def test_ties_go_to_the_earlier_position():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0], [2.0, 0.0, 2.0, 0.0]])
    mask = taopd.select(scores, ratio=0.25)  # n = 2 of 8
    assert mask.tolist() == [[False, True, True, False], [False] * 4]


def test_sequence_scope_applies_rule_per_row():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 3.0, 4.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    mask = taopd.select(scores, valid, ratio=0.5, scope="sequence")
    assert mask.tolist() == [[True, True, False, False], [False, True, True, False]]
    batch = taopd.select(scores, valid, ratio=0.5)
    assert batch[0].sum() == 4 and batch[1].sum() == 0


def test_min_per_sequence_keeps_one_in_every_nonempty_row():
    scores = torch.tensor([[9.0, 8.0, 7.0], [1.0, 2.0, 0.0], [5.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    mask = taopd.select(scores, valid, ratio=0.1, min_per_sequence=1)
    assert mask.tolist() == [[True, False, False], [False, True, False], [False] * 3]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "0.1", None, True])
def test_ratio_outside_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"ratio must be .*\(0, 1\]"):
        taopd.select(torch.rand(10), ratio=bad)


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="teachability"):
        taopd.select_tokens(random_signals(), strategy="nope")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_gives_a_valid_mask(name):
    sig = random_signals()
    valid = torch.ones(4, 25, dtype=torch.bool)
    valid[:, 20:] = False
    mask = taopd.select_tokens(
        sig, valid, strategy=name, ratio=0.1, generator=torch.Generator().manual_seed(0)
    )
    assert not (mask & ~valid).any()
    expected = 80 if name == "full" else 8
    if name == "q3":
        assert 0 < int(mask.sum()) <= 8
    else:
        assert int(mask.sum()) == expected


def test_strategy_formulas_against_reference():
    sig = random_signals(seed=3)
    valid = torch.ones(4, 25, dtype=torch.bool)
    h = ref.normalize(sig.student_entropy.flatten().tolist())
    d = ref.normalize(sig.disagreement.flatten().tolist())
    c = ref.normalize(sig.compatibility.flatten().tolist())
    kl = ref.normalize(sig.reverse_kl.flatten().tolist())
    teach = [a * b for a, b in zip(d, c)]
    want = {
        "entropy": h,
        "divergence": d,
        "compatibility": c,
        "reverse_kl": kl,
        "teachability": teach,
        "incompatible": [a * (1 - b) for a, b in zip(d, c)],
        "tip": [a + b - a * b for a, b in zip(h, d)],
        "teachability_entropy": [a + b - a * b for a, b in zip(h, teach)],
    }
    for name, values in want.items():
        got = taopd.strategy_scores(name, sig, valid).flatten().tolist()
        assert got == pytest.approx(values, abs=1e-6), name
    q3 = taopd.strategy_scores("q3", sig, valid).flatten().tolist()
    mh, md = ref.quantile(h, 0.5), ref.quantile(d, 0.5)
    for i, value in enumerate(q3):
        inside = h[i] < mh and d[i] >= md
        assert (value == pytest.approx(d[i], abs=1e-6)) if inside else value == -math.inf


def test_random_strategy_is_seeded():
    sig = random_signals()
    a = taopd.select_tokens(sig, strategy="random", generator=torch.Generator().manual_seed(1))
    b = taopd.select_tokens(sig, strategy="random", generator=torch.Generator().manual_seed(1))
    c = taopd.select_tokens(sig, strategy="random", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 5),
    t=st.integers(1, 30),
    ratio=st.floats(1e-4, 1.0),
    scope=st.sampled_from(["batch", "sequence"]),
    seed=st.integers(0, 10_000),
    min_per=st.integers(0, 2),
)
def test_selection_counts_follow_the_rule(b, t, ratio, scope, seed, min_per):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (b, t), generator=g).float()  # many ties
    valid = torch.rand(b, t, generator=g) > 0.4
    mask = taopd.select(scores, valid, ratio, scope=scope, min_per_sequence=min_per)
    assert not (mask & ~valid).any()
    if scope == "batch":
        n = math.ceil(round(ratio * int(valid.sum()), 9))
        base = taopd.select(scores, valid, ratio, scope=scope)
        assert int(base.sum()) == n
        # kept positions score at least as high as every unkept valid one
        if 0 < n < int(valid.sum()):
            assert scores[base].min() >= scores[valid & ~base].max()
    else:
        for i in range(b):
            nv = int(valid[i].sum())
            want = math.ceil(round(ratio * nv, 9))
            assert int(mask[i].sum()) == min(nv, max(want, min_per))
    for i in range(b):
        if valid[i].any():
            assert int(mask[i].sum()) >= min(min_per, int(valid[i].sum()))

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taopd
from tests import reference as ref

FIELDS = [
    "student_entropy",
    "teacher_entropy",
    "reverse_kl",
    "forward_kl",
    "disagreement",
    "compatibility",
    "compatibility_lb",
    "overlap",
]


def distinct_logits(shape, seed, scale=3.0):
    """Random logits without ties (so top-K sets are well defined)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return x + torch.arange(shape[-1], dtype=torch.float64) * 1e-6


@pytest.mark.parametrize("k", [1, 4, 16])
def test_signals_match_float64_reference(k):
    s, t = distinct_logits((3, 5, 40), 0), distinct_logits((3, 5, 40), 1)
    tokens = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(2))
    sig = taopd.token_signals(s.float(), t.float(), tokens=tokens, k=k)
    for b in range(3):
        for i in range(5):
            want = ref.signals(s[b, i], t[b, i], k, int(tokens[b, i]))
            for name, value in want.items():
                got = float(getattr(sig, name)[b, i])
                assert got == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_disagreement_uses_true_probabilities_on_union():
    # Teacher's top id is outside the student's top-1: D renormalizes both true distributions on U.
    s = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 4.0, 1.0, -1.0]])
    sig = taopd.token_signals(s, t, k=1)
    ps, pt = torch.softmax(s[0].double(), -1), torch.softmax(t[0].double(), -1)
    u = [0, 1]
    ps_u, pt_u = ps[u] / ps[u].sum(), pt[u] / pt[u].sum()
    want = float((pt_u * (pt_u.log() - ps_u.log())).sum())
    assert float(sig.disagreement[0]) == pytest.approx(want, rel=1e-5)
    assert float(sig.compatibility[0]) == pytest.approx(float(pt[0]), rel=1e-5)
    assert float(sig.compatibility_lb[0]) == 0.0  # S^S ∩ S^T is empty
    assert float(sig.overlap[0]) == 0.0


def test_identical_models_have_zero_divergences_and_full_overlap():
    x = distinct_logits((2, 7, 30), 3).float()
    sig = taopd.token_signals(x, x.clone(), k=5)
    for name in ("reverse_kl", "forward_kl", "disagreement"):
        assert getattr(sig, name).abs().max() < 1e-5
    assert torch.allclose(sig.overlap, torch.ones(2, 7))
    assert torch.allclose(sig.compatibility, sig.compatibility_lb)


def test_invalid_positions_are_zero_and_skipped():
    s, t = distinct_logits((2, 6, 20), 4).float(), distinct_logits((2, 6, 20), 5).float()
    valid = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    s[~valid] = float("nan")  # garbage at padded positions must not leak anywhere
    sig = taopd.token_signals(s, t, k=3, valid=valid)
    full = taopd.token_signals(torch.nan_to_num(s), t, k=3)
    for name, value in sig.items():
        assert torch.all(value[~valid] == 0), name
        assert torch.allclose(value[valid], getattr(full, name)[valid]), name


def test_temperature_applies_to_both_models():
    s, t = distinct_logits((4, 50), 6).float(), distinct_logits((4, 50), 7).float()
    hot = taopd.token_signals(s, t, k=8, temperature=2.0)
    scaled = taopd.token_signals(s / 2, t / 2, k=8)
    for name, value in hot.items():
        assert torch.allclose(value, getattr(scaled, name), atol=1e-6), name


def test_padded_vocabularies_align_to_tokenizer_length():
    s = distinct_logits((3, 100), 8).float()
    t = torch.cat([distinct_logits((3, 100), 9).float(), torch.full((3, 28), 50.0)], -1)
    with pytest.raises(ValueError, match="vocab_size"):
        taopd.token_signals(s, t)
    sig = taopd.token_signals(s, t, k=4, vocab_size=100)
    want = taopd.token_signals(s, t[:, :100], k=4)
    assert torch.equal(sig.disagreement, want.disagreement)


def test_k_larger_than_vocab_is_an_error():
    with pytest.raises(ValueError, match="k must be in"):
        taopd.token_signals(torch.randn(2, 8), torch.randn(2, 8), k=16)


def test_chunked_hidden_path_equals_direct_path():
    g = torch.Generator().manual_seed(10)
    hs, ht = torch.randn(3, 17, 24, generator=g), torch.randn(3, 17, 40, generator=g)
    ws, wt = torch.randn(500, 24, generator=g) * 0.3, torch.randn(512, 40, generator=g) * 0.3
    valid = torch.rand(3, 17, generator=g) > 0.3
    tokens = torch.randint(0, 500, (3, 17), generator=g)
    direct = taopd.token_signals(
        hs @ ws.T, (ht @ wt.T)[..., :500], tokens=tokens, k=16, valid=valid
    )
    for chunk in (1, 5, 64):
        chunked = taopd.signals_from_hidden(
            hs, ws, ht, wt, tokens=tokens, k=16, valid=valid, vocab_size=500, chunk_size=chunk
        )
        for name, value in direct.items():
            assert torch.allclose(getattr(chunked, name), value, atol=1e-5, rtol=1e-5), name


def test_normalize_matches_reference_and_handles_nonfinite():
    z = torch.tensor([0.5, 3.0, -1.0, float("inf"), float("nan"), 2.0, 7.0, 1.0])
    valid = torch.tensor([1, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    out = taopd.normalize(z, valid)
    vals = [z[i].item() for i in range(8) if valid[i]]
    want = ref.normalize(vals)
    assert out[valid].tolist() == pytest.approx(want, abs=1e-6)
    assert out[6] == 0
    assert out.min() >= 0 and out.max() <= 1


def test_quantile_matches_torch():
    x = torch.randn(1001, dtype=torch.float64)
    for q in (0.0, 0.05, 0.5, 0.95, 1.0):
        assert float(taopd.quantile(x, q)) == pytest.approx(float(torch.quantile(x, q)))


def test_teachability_is_product_of_normalized_d_and_c():
    s, t = distinct_logits((4, 9, 64), 11).float(), distinct_logits((4, 9, 64), 12).float()
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[:, 7:] = False
    score = taopd.teachability(s, t, k=16, valid=valid)
    sig = taopd.token_signals(s, t, k=16, valid=valid)
    d = ref.normalize(sig.disagreement[valid].tolist())
    c = ref.normalize(sig.compatibility[valid].tolist())
    assert score[valid].tolist() == pytest.approx([a * b for a, b in zip(d, c)], abs=1e-6)
    assert torch.all(score[~valid] == 0)


@settings(max_examples=40, deadline=None)
@given(
    vocab=st.sampled_from([2, 3, 7, 64, 1000, 50_000]),
    rows=st.integers(1, 4),
    k=st.integers(1, 20),
    scale=st.sampled_from([0.01, 1.0, 30.0, 1e4]),
    n_neg_inf=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_signal_ranges_hold_for_any_logits(vocab, rows, k, scale, n_neg_inf, seed):
    k = min(k, vocab)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g) * scale
    t = torch.randn(rows, vocab, generator=g) * scale
    # -inf logits on a few ids (never all: each row keeps a finite maximum)
    for x in (s, t):
        ids = torch.randint(0, vocab, (n_neg_inf,), generator=g)
        keep = x.argmax(-1)
        x[:, ids] = -math.inf
        x[torch.arange(rows), keep] = 0.0 if scale < 1 else scale
    sig = taopd.token_signals(s, t, k=k, tokens=s.argmax(-1))
    log_v = math.log(vocab)
    tol = 1e-4
    assert torch.all(sig.student_entropy >= -tol) and torch.all(sig.student_entropy <= log_v + tol)
    assert torch.all(sig.teacher_entropy >= -tol) and torch.all(sig.teacher_entropy <= log_v + tol)
    for name in ("reverse_kl", "forward_kl", "disagreement"):
        value = getattr(sig, name)
        assert not torch.isnan(value).any(), name
        assert torch.all(value >= -tol), name  # may be +inf when one side has zero mass
    for name in ("compatibility", "compatibility_lb", "overlap"):
        value = getattr(sig, name)
        assert torch.all(value >= -tol) and torch.all(value <= 1 + tol), name
    assert torch.all(sig.compatibility_lb <= sig.compatibility + tol)
    # the sampled id is the student's argmax: log p_S(y) is finite, p_T(y) may be 0 (+inf)
    assert not torch.isnan(sig.log_ratio).any() and torch.all(sig.log_ratio > -math.inf)
    score = taopd.teachability(s, t, k=k)
    assert torch.all((score >= 0) & (score <= 1))


def test_bf16_projections_approximate_the_float32_signals():
    g = torch.Generator().manual_seed(21)
    hs, ht = torch.randn(4, 50, 32, generator=g), torch.randn(4, 50, 48, generator=g)
    ws, wt = torch.randn(3000, 32, generator=g) * 0.2, torch.randn(3000, 48, generator=g) * 0.2
    full = taopd.signals_from_hidden(hs, ws, ht, wt, k=8)
    half = taopd.signals_from_hidden(hs, ws, ht, wt, k=8, projection_dtype=torch.bfloat16)
    assert half.student_entropy.dtype == torch.float32  # the sums stay in float32
    for name in ("student_entropy", "teacher_entropy", "reverse_kl", "forward_kl"):
        a, b = getattr(full, name), getattr(half, name)
        assert torch.allclose(a, b, rtol=0.05, atol=0.05), name
        assert not torch.equal(a, b), name  # the option really changes the projection
    keep_full = taopd.select_tokens(full, ratio=0.1)
    keep_half = taopd.select_tokens(half, ratio=0.1)
    assert (keep_full & keep_half).sum() >= 0.7 * keep_full.sum()


# ---------------------------------------------------------------------------------------------
# lm_head bias, logit scale, final-logit softcapping (HeadSpec); teacher top-k from logits

HEADS = {
    "bias": lambda b: taopd.HeadSpec(bias=b),
    "scale": lambda b: taopd.HeadSpec(scale=0.37),
    "softcap": lambda b: taopd.HeadSpec(softcap=2.5),
    "all": lambda b: taopd.HeadSpec(bias=b, scale=1.7, softcap=3.0),
}


def _dense_logits(h, w, head):
    z = h @ w.T
    if head.bias is not None:
        z = z + head.bias
    z = z * head.scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z


@pytest.mark.parametrize("variant", sorted(HEADS))
def test_signals_from_hidden_head_variants_equal_dense(variant):
    g = torch.Generator().manual_seed(7)
    h_s, h_t = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 12, generator=g)
    w_s, w_t = torch.randn(50, 8, generator=g), torch.randn(50, 12, generator=g)
    b_s, b_t = torch.randn(50, generator=g), torch.randn(50, generator=g)
    head_s, head_t = HEADS[variant](b_s), HEADS[variant](b_t)
    if variant == "all":  # different transforms on the two sides
        head_t = taopd.HeadSpec(bias=b_t, scale=0.5, softcap=1.5)
    tokens = torch.randint(0, 50, (2, 6), generator=g)
    valid = torch.rand(2, 6, generator=g) > 0.2
    kw = dict(tokens=tokens, k=5, valid=valid, temperature=0.8)
    got = taopd.signals_from_hidden(
        h_s, w_s, h_t, w_t, chunk_size=4, student_head=head_s, teacher_head=head_t, **kw
    )
    dense_s, dense_t = _dense_logits(h_s, w_s, head_s), _dense_logits(h_t, w_t, head_t)
    want = taopd.token_signals(dense_s, dense_t, **kw)
    plain = taopd.signals_from_hidden(h_s, w_s, h_t, w_t, **kw)
    for name, value in want.items():
        torch.testing.assert_close(getattr(got, name), value, rtol=1e-5, atol=1e-5, msg=name)
    assert not torch.allclose(plain.disagreement, want.disagreement)  # the head mattered


def test_head_spec_refuses_bad_values_by_name():
    with pytest.raises(ValueError, match="scale"):
        taopd.HeadSpec(scale=0.0)
    with pytest.raises(ValueError, match="softcap"):
        taopd.HeadSpec(softcap=-1.0)
    with pytest.raises(ValueError, match="bias"):
        taopd.HeadSpec(bias=torch.zeros(3, 4))
    h, w = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="student head bias has 9 entries"):
        taopd.signals_from_hidden(h, w, h, w, k=2, student_head=taopd.HeadSpec(torch.zeros(9)))


@pytest.mark.parametrize("k", [3, 40])
def test_topk_signals_equal_exact_when_teacher_returns_every_id(k):
    s, t = distinct_logits((2, 5, 40), 11).float(), distinct_logits((2, 5, 40), 12).float()
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    lt = torch.log_softmax(t, -1)
    order = lt.argsort(-1, descending=True)  # all V ids, in the server's (descending) order
    got = taopd.topk_signals(s, order, lt.gather(-1, order), k=k, valid=valid)
    exact = taopd.token_signals(s, t, k=k, valid=valid)
    torch.testing.assert_close(got.disagreement, exact.disagreement, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.compatibility, exact.compatibility, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.compatibility_lb, exact.compatibility, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.student_entropy, exact.student_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.overlap, exact.overlap)
    assert torch.isnan(got.reverse_kl).all()


def test_topk_signals_from_a_true_top_k_give_the_lower_bound():
    s, t = distinct_logits((4, 30), 21).float(), distinct_logits((4, 30), 22).float()
    lt = torch.log_softmax(t, -1)
    top = lt.topk(4, -1)
    got = taopd.topk_signals(s, top.indices, top.values, k=4)
    exact = taopd.token_signals(s, t, k=4)
    # With only the teacher's top-K, Ĉ is Eq. 17's bound: Σ p_T over S^S ∩ S^T.
    torch.testing.assert_close(got.compatibility, exact.compatibility_lb, rtol=1e-5, atol=1e-6)
    assert bool((got.compatibility <= exact.compatibility + 1e-6).all())
    with pytest.raises(ValueError, match="fewer than k=5"):
        taopd.topk_signals(s, top.indices, top.values, k=5)


# ---------------------------------------------------------------------------------------------
# The scoring pass's fast paths (issue #17): block top-K, batched Σ p log q, reused workspace


@pytest.mark.parametrize("vocab", [1000, 4096, 4099, 49_152])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_block_topk_returns_the_topk_set(vocab, k):
    from taopd.core.scores import _topk_ids

    g = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(5, 2, vocab, generator=g)
    x[0, 0, 3:40] = 10.0 + torch.arange(37) * 1e-3  # the whole top-K inside one block
    x[1, 1, vocab - 2 :] = 20.0  # in the tail no block covers (vocab not a multiple of 64)
    x[2, 0, : vocab // 2] = -math.inf
    got = _topk_ids(x, k).sort(-1).values
    want = x.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(got, want)


def test_signals_from_hidden_with_a_workspace_match_float64_reference():
    # vocab 3000 with k=4: the block top-K path; the same workspace serves calls of other sizes
    g = torch.Generator().manual_seed(31)
    hs, ht = torch.randn(2, 9, 24, generator=g), torch.randn(2, 9, 40, generator=g)
    ws, wt = torch.randn(3000, 24, generator=g) * 0.4, torch.randn(3000, 40, generator=g) * 0.4
    tokens = torch.randint(0, 3000, (2, 9), generator=g)
    workspace = taopd.core.scores.Workspace()
    for chunk in (4, 64, 3):
        sig = taopd.signals_from_hidden(
            hs, ws, ht, wt, tokens=tokens, k=4, chunk_size=chunk, workspace=workspace
        )
        s_logits, t_logits = (hs.double() @ ws.T.double()), (ht.double() @ wt.T.double())
        for b, i in [(0, 0), (0, 8), (1, 4)]:
            want = ref.signals(s_logits[b, i], t_logits[b, i], 4, int(tokens[b, i]))
            for name, value in want.items():
                got = float(getattr(sig, name)[b, i])
                assert got == pytest.approx(value, rel=1e-4, abs=1e-5), (chunk, name)
    assert workspace.nbytes == 2 * 18 * 2 * 3000 * 4  # grown to the largest chunk (18 rows), kept
    workspace.clear()
    assert workspace.nbytes == 0

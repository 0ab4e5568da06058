import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taopd
from tests import reference as ref

KINDS = ["reverse_kl", "forward_kl", "jsd", "pg"]


def make(shape=(3, 6), vocab=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, vocab, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.5
    mask[0, 0] = True
    return s, t, tokens, mask


def reference_loss(s, t, tokens, mask, kind, beta=0.5, reduction="token"):
    terms = {}
    for idx in mask.nonzero().tolist():
        b, i = idx
        terms[(b, i)] = ref.loss_value(s[b, i], t[b, i], kind, int(tokens[b, i]), beta)
    if reduction == "token":
        return sum(terms.values()) / len(terms)
    seqs = sorted({b for b, _ in terms})
    per_seq = [
        sum(v for (b, _), v in terms.items() if b == sb) / sum(1 for (b, _) in terms if b == sb)
        for sb in seqs
    ]
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_loss_and_gradient_match_float64_reference(kind, reduction):
    s, t, tokens, mask = make()
    got = taopd.opd_loss(s, t, mask, kind=kind, tokens=tokens, beta=0.3, reduction=reduction)
    (g_got,) = torch.autograd.grad(got, s)
    want = reference_loss(s, t, tokens, mask, kind, beta=0.3, reduction=reduction)
    (g_want,) = torch.autograd.grad(want, s)
    assert float(got) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
    assert torch.allclose(g_got, g_want, atol=1e-10)
    assert torch.all(g_got[~mask] == 0)  # unselected positions get no gradient


def test_pg_gradient_equals_gradient_of_sampled_token_estimator():
    # ∇(-A·log p) with A detached = ∇ of log p_S(y)·(log p_S(y) - log p_T(y)) at the sampled id
    s, t, tokens, mask = make(seed=5)
    loss = taopd.opd_loss(s, t, mask, kind="pg", tokens=tokens)
    (g,) = torch.autograd.grad(loss, s)
    ls = torch.log_softmax(s, -1)
    lt = torch.log_softmax(t, -1)
    lp = ls.gather(-1, tokens[..., None])[..., 0]
    ratio = (lp - lt.gather(-1, tokens[..., None])[..., 0]).detach()
    (g2,) = torch.autograd.grad((lp * ratio)[mask].sum() / mask.sum(), s)
    assert torch.allclose(g, g2, atol=1e-12)


def test_pg_clipping_limits_stale_ratio():
    s, t, tokens, mask = make(seed=6)
    old = torch.log_softmax(s.detach(), -1).gather(-1, tokens[..., None])[..., 0] - 1.0
    loss = taopd.opd_loss(s, t, mask, kind="pg", tokens=tokens, old_logprobs=old)
    assert torch.isfinite(loss)
    (g,) = torch.autograd.grad(loss, s)
    adv = -(torch.log_softmax(s, -1) - torch.log_softmax(t, -1)).gather(-1, tokens[..., None])
    # ratio e ≈ 2.7 > 1.28: where the advantage is positive the clipped branch has no gradient
    pos = (adv[..., 0] > 0) & mask
    assert torch.all(g[pos] == 0)


def test_jsd_beta_limits_approach_the_kls():
    s, t, tokens, mask = make(seed=7)
    fwd = taopd.opd_loss(s, t, mask, kind="forward_kl")
    rev = taopd.opd_loss(s, t, mask, kind="reverse_kl")
    j_small = taopd.opd_loss(s, t, mask, kind="jsd", beta=1e-6)
    assert 0 < float(j_small) < 1e-3  # β→0: m→p_S, only a vanishing β·KL(p_T‖m) remains
    assert float(taopd.opd_loss(s, t, mask, kind="jsd", beta=0.5)) < min(float(fwd), float(rev))
    with pytest.raises(ValueError, match="beta"):
        taopd.opd_loss(s, t, mask, kind="jsd", beta=1.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_gradient_accumulation_sums_to_whole_batch(kind, reduction):
    s, t, tokens, mask = make(shape=(6, 5), seed=8)
    whole = taopd.opd_loss(s, t, mask, kind=kind, tokens=tokens, reduction=reduction)
    (g_whole,) = torch.autograd.grad(whole, s)
    # the whole batch's normalizer: kept tokens, or sequences with a kept token
    norm = float(mask.sum()) if reduction == "token" else float((mask.sum(-1) > 0).sum())
    total = 0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        total = total + taopd.opd_loss(
            s[rows],
            t[rows],
            mask[rows],
            kind=kind,
            tokens=tokens[rows],
            normalizer=norm,
            reduction=reduction,
        )
    (g_acc,) = torch.autograd.grad(total, s)
    assert float(total) == pytest.approx(float(whole), rel=1e-12)
    assert torch.allclose(g_acc, g_whole, atol=1e-12)


def test_empty_selection_errors_without_normalizer_and_is_zero_with_one():
    s, t, tokens, _ = make()
    empty = torch.zeros(3, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="selects no positions"):
        taopd.opd_loss(s, t, empty)
    loss = taopd.opd_loss(s, t, empty, normalizer=10.0)
    assert float(loss) == 0.0
    loss.backward()  # a micro-batch with nothing kept still joins the graph
    assert torch.all(s.grad == 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_selective_head_equals_dense_path(kind, chunk):
    g = torch.Generator().manual_seed(9)
    h = torch.randn(4, 7, 16, generator=g, requires_grad=True)
    w = (torch.randn(300, 16, generator=g) * 0.5).requires_grad_(True)
    ht, wt = torch.randn(4, 7, 12, generator=g), torch.randn(310, 12, generator=g) * 0.5
    tokens = torch.randint(0, 300, (4, 7), generator=g)
    mask = torch.rand(4, 7, generator=g) > 0.6
    dense = taopd.opd_loss(h @ w.T, (ht @ wt.T)[..., :300], mask, kind=kind, tokens=tokens)
    g_dense = torch.autograd.grad(dense, (h, w))
    for teacher in ("hidden", "logits", "rows"):
        if teacher == "hidden":
            extra = {"teacher_hidden": ht, "teacher_weight": wt}
        elif teacher == "logits":
            extra = {"teacher_logits": ht @ wt.T}
        else:
            extra = {"teacher_logits": (ht @ wt.T)[mask]}
        sel = taopd.selective_head_loss(
            h, w, mask, kind=kind, tokens=tokens, vocab_size=300, chunk_size=chunk, **extra
        )
        g_sel = torch.autograd.grad(sel, (h, w))
        assert float(sel) == pytest.approx(float(dense), rel=1e-5)
        for a, b in zip(g_sel, g_dense):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_selective_head_composes_with_upstream_graph():
    g = torch.Generator().manual_seed(1)
    body = torch.nn.Linear(8, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    x = torch.randn(2, 5, 8, generator=g)
    t = torch.randn(2, 5, 50, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    dense = taopd.opd_loss(head(body(x)), t, mask)
    grads_dense = torch.autograd.grad(dense, [body.weight, head.weight])
    sel = taopd.selective_head_loss(body(x), head.weight, mask, teacher_logits=t, chunk_size=2)
    grads_sel = torch.autograd.grad(sel, [body.weight, head.weight])
    for a, b in zip(grads_sel, grads_dense):
        assert torch.allclose(a, b, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    vocab=st.sampled_from([2, 5, 100, 5000, 50_000]),
    n=st.integers(1, 4),
    kind=st.sampled_from(KINDS),
    scale=st.sampled_from([0.1, 1.0, 50.0]),
    seed=st.integers(0, 1000),
)
def test_losses_finite_and_nonnegative_with_shared_neg_inf_logits(vocab, n, kind, scale, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vocab, generator=g) * scale
    t = torch.randn(n, vocab, generator=g) * scale
    if vocab > 2:
        s[:, 0] = -torch.inf  # an id both sides mask out (e.g. a padded vocabulary row)
        t[:, 0] = -torch.inf
        s[:, 1] = s.max() + 1
    s.requires_grad_(True)
    tokens = s.detach().argmax(-1)
    loss = taopd.opd_loss(s, t, kind=kind, tokens=tokens, beta=0.5)
    assert torch.isfinite(loss)
    if kind != "pg":
        assert float(loss) >= -1e-5
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_zero_student_mass_where_teacher_has_mass_gives_infinite_forward_kl():
    s = torch.tensor([[-torch.inf, 1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 0.0]])
    assert torch.isinf(taopd.opd_loss(s, t, kind="forward_kl"))
    assert torch.isfinite(taopd.opd_loss(s, t, kind="reverse_kl"))


def _head_logits(h, w, head):
    z = h @ w.T
    if head.bias is not None:
        z = z + head.bias
    z = z * head.scale
    return head.softcap * torch.tanh(z / head.softcap) if head.softcap is not None else z


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["bias", "scale", "softcap", "all"])
def test_selective_head_with_bias_scale_softcap_equals_dense_path(kind, variant):
    g = torch.Generator().manual_seed(13)
    h = torch.randn(3, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(40, 16, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    b = torch.randn(40, generator=g, dtype=torch.float64).requires_grad_(True)
    ht = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    wt = torch.randn(40, 12, generator=g, dtype=torch.float64) * 0.5
    bt = torch.randn(40, generator=g, dtype=torch.float64)
    specs = {
        "bias": ({"bias": b}, {"bias": bt}),
        "scale": ({"scale": 0.3}, {"scale": 2.0}),
        "softcap": ({"softcap": 1.5}, {"softcap": 4.0}),
        "all": (
            {"bias": b, "scale": 1.3, "softcap": 2.0},
            {"bias": bt, "scale": 0.7, "softcap": 3.0},
        ),
    }[variant]
    head_s, head_t = taopd.HeadSpec(**specs[0]), taopd.HeadSpec(**specs[1])
    tokens = torch.randint(0, 40, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    mask[0, 0] = True
    params = (h, w, b) if head_s.bias is not None else (h, w)
    kw = dict(kind=kind, tokens=tokens, temperature=0.9)
    dense = taopd.opd_loss(_head_logits(h, w, head_s), _head_logits(ht, wt, head_t), mask, **kw)
    g_dense = torch.autograd.grad(dense, params)
    sel = taopd.selective_head_loss(
        h, w, mask, teacher_hidden=ht, teacher_weight=wt, chunk_size=3,
        student_head=head_s, teacher_head=head_t, **kw,
    )  # fmt: skip
    g_sel = torch.autograd.grad(sel, params)
    assert float(sel) == pytest.approx(float(dense), rel=1e-6)  # the sum is float32
    for a, c in zip(g_sel, g_dense):
        torch.testing.assert_close(a, c, rtol=1e-8, atol=1e-10)
    plain = taopd.opd_loss(h @ w.T, ht @ wt.T, mask, **kw)
    assert float(plain) != pytest.approx(float(dense), rel=1e-3)  # the head mattered


def test_selective_head_refuses_a_teacher_head_with_final_logits():
    h, w = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="teacher_head applies to teacher_hidden"):
        taopd.selective_head_loss(
            h, w, torch.ones(2, dtype=torch.bool), teacher_logits=torch.randn(2, 10),
            teacher_head=taopd.HeadSpec(scale=2.0),
        )  # fmt: skip

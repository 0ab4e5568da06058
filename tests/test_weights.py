"""Soft token weights (core/weights.py) and the position rule `early`, against float64
references written from the papers' formulas, and IW-OPD against TRL 1.16's own loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from taopd.core.loss import opd_loss
from taopd.core.scores import token_signals
from taopd.core.selection import relative_position, select, select_tokens, strategy_scores
from taopd.core.weights import check_mode, iw_opd_weights, score_weights, token_weights


def ragged_valid(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def iw_reference(a: list[float], gamma: float = 0.5, eps: float = 1e-8) -> list[float]:
    """w_t = 1 + γ(1 − Σ_{s<t}|a_s| / max(Σ_s|a_s|, ε)), one rollout, plain floats."""
    total = max(sum(abs(x) for x in a), eps)
    out, prefix = [], 0.0
    for x in a:
        out.append(1.0 + gamma * (1.0 - prefix / total))
        prefix += abs(x)
    return out


def test_iw_opd_weights_match_the_formula_per_rollout():
    torch.manual_seed(0)
    lengths = [5, 3, 1, 0]
    valid = ragged_valid(lengths, 6)
    lr = torch.randn(4, 6, dtype=torch.float64)
    w = iw_opd_weights(lr, valid, gamma=0.7)
    for i, n in enumerate(lengths):
        ref = iw_reference(lr[i, :n].tolist(), gamma=0.7)
        assert w[i, :n].tolist() == pytest.approx(ref, abs=1e-12)
        assert (w[i, n:] == 0).all()  # invalid positions weigh nothing
    assert w[0, 0] == pytest.approx(1.7)  # the first token of a rollout gets the full 1 + γ
    assert bool((w[valid] >= 1).all()) and bool((w[valid] <= 1.7 + 1e-12).all())


def test_iw_opd_weights_ignore_padding_between_rollouts():
    """A padded position's log-ratio must not count in its rollout's accumulated discrepancy."""
    lr = torch.tensor([[0.5, -1.0, 9.0, 9.0]])
    valid = torch.tensor([[True, True, False, False]])
    assert iw_opd_weights(lr, valid).tolist()[0][:2] == pytest.approx(iw_reference([0.5, -1.0]))


def _trl_iw_opd_loss(student_logits, tokens, valid, teacher_token_logprobs, gamma):
    """TRL 1.16's IW-OPD loss, called as its trainer calls it (a stand-in `self`)."""
    trl_iw = pytest.importorskip("trl.experimental.iw_opd.iw_opd_trainer")
    fake = SimpleNamespace(
        temperature=1.0,
        iw_opd_gamma=gamma,
        iw_opd_epsilon=1e-8,
        model=SimpleNamespace(training=True),
        _metrics={"train": __import__("collections").defaultdict(list)},
    )
    labels = torch.where(valid, tokens, torch.full_like(tokens, -100))
    return trl_iw.IWOPDTrainer._compute_iw_opd_loss(
        fake, student_logits, tokens, labels, teacher_token_logprobs
    )


def test_iw_opd_weighted_pg_loss_equals_trl_loss_and_gradient():
    torch.manual_seed(1)
    B, T, V = 3, 7, 11
    valid = ragged_valid([7, 4, 2], T)
    s_logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(B, T, V, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T))
    lt_tok = torch.log_softmax(t_logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    ref = _trl_iw_opd_loss(s_logits, tokens, valid, lt_tok, gamma=0.5)
    (g_ref,) = torch.autograd.grad(ref, s_logits)

    sig = token_signals(s_logits.detach(), t_logits, tokens=tokens, k=4, valid=valid)
    w = token_weights(sig, valid, "iw_opd", gamma=0.5)
    ours = opd_loss(s_logits, t_logits, valid, kind="pg", tokens=tokens, token_weights=w)
    (g_ours,) = torch.autograd.grad(ours, s_logits)
    assert torch.allclose(g_ours, g_ref, atol=1e-12)  # the same update
    # the values differ by design: TRL logs the surrogate −w·A·log p_θ(y), taopd's 'pg' the
    # clipped ratio form −w·r·A (r = 1 on-policy), i.e. the weighted sampled-token KL estimate
    ls = torch.log_softmax(s_logits.detach(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    a = lt_tok - ls
    assert float(ours) == pytest.approx(float((-w * a)[valid].sum() / valid.sum()), rel=1e-10)
    assert float(ref) == pytest.approx(float((-w * a * ls)[valid].sum() / valid.sum()), rel=1e-10)


def test_score_weights_have_mean_one_and_follow_the_floor_formula():
    scores = torch.tensor([[0.0, 0.5, 1.0, -math.inf], [0.25, float("nan"), 2.0, 0.3]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    w = score_weights(scores, valid, floor=0.2)
    s = [0.0, 0.5, 1.0, 0.0, 0.25, 0.0, 1.0]  # -inf and NaN → 0, 2.0 clipped to 1
    raw = [0.2 + 0.8 * x for x in s]
    ref = [x / (sum(raw) / len(raw)) for x in raw]
    assert w[valid].tolist() == pytest.approx(ref, abs=1e-6)
    assert float(w[valid].mean()) == pytest.approx(1.0)
    assert w[1, 3] == 0
    assert torch.equal(score_weights(scores, valid, floor=1.0), valid.float())  # floor 1: full OPD
    zero = score_weights(torch.zeros(2, 3), None, floor=0.0)  # nothing scored: uniform
    assert torch.equal(zero, torch.ones(2, 3))


def test_teachability_weights_rank_like_teachability():
    torch.manual_seed(2)
    s, t = torch.randn(2, 20, 50), torch.randn(2, 20, 50)
    sig = token_signals(s, t, k=4)
    w = token_weights(sig, None, "teachability", floor=0.0)
    scores = strategy_scores("teachability", sig)
    assert torch.allclose(w, scores / scores.mean(), atol=1e-6)


def test_weighted_loss_is_the_weighted_mean_of_per_token_losses():
    torch.manual_seed(3)
    s, t = torch.randn(2, 5, 9, dtype=torch.float64), torch.randn(2, 5, 9, dtype=torch.float64)
    valid = ragged_valid([5, 3], 5)
    w = torch.rand(2, 5, dtype=torch.float64)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)
    ref = float((kl * w)[valid].sum() / valid.sum())
    assert float(opd_loss(s, t, valid, token_weights=w)) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="finite and >= 0"):
        opd_loss(s, t, valid, token_weights=-w)


def test_early_keeps_the_first_share_of_every_rollout():
    valid = ragged_valid([20, 10, 40], 40)
    sig = token_signals(torch.randn(3, 40, 30), torch.randn(3, 40, 30), k=4, valid=valid)
    per_seq = select_tokens(sig, valid, "early", ratio=0.1, scope="sequence")
    for i, n in enumerate([20, 10, 40]):
        assert per_seq[i].nonzero().squeeze(-1).tolist() == list(range(math.ceil(0.1 * n)))
    batch = select_tokens(sig, valid, "early", ratio=0.1, scope="batch")
    assert int(batch.sum()) == 7  # ⌈0.1·70⌉
    rel = relative_position(valid)
    assert float(rel[batch].max()) < 0.1  # every kept position is in its rollout's first 10%


def test_early_reads_given_relative_positions():
    """A flattened bank (the diagnostic) passes relative positions; the mask has no rows."""
    sig = token_signals(torch.randn(6, 10), torch.randn(6, 10), k=3)
    sig.relative_position = torch.tensor([0.9, 0.0, 0.5, 0.1, 0.7, 0.2], dtype=torch.float64)
    keep = select(strategy_scores("early", sig), None, ratio=0.5)
    assert keep.nonzero().squeeze(-1).tolist() == [1, 3, 5]


@pytest.mark.parametrize(
    ("strategy", "mode", "ratio", "match"),
    [
        ("iw_opd", "select", 0.05, "not a ranking"),
        ("random", "weight", 1.0, "no meaning as a weight"),
        ("teachability", "weight", 0.05, "means nothing"),
        ("teachability", "soft", 1.0, "mode must be one of"),
        ("nonsense", "weight", 1.0, "strategy must be one of"),
    ],
)
def test_meaningless_combinations_are_refused(strategy, mode, ratio, match):
    with pytest.raises(ValueError, match=match):
        check_mode(strategy, mode, ratio)


def test_iw_opd_without_the_log_ratio_is_refused():
    sig = token_signals(torch.randn(2, 4, 9), torch.randn(2, 4, 9), k=3)  # no tokens
    with pytest.raises(ValueError, match="sampled-token log-ratio"):
        token_weights(sig, None, "iw_opd")

"""Per-row signal kernels: entropies, KLs, top-K disagreement and compatibility for rows of
logits (both models' full rows, or the student's and a teacher's top-k answer).

Imports torch only. `scores.py` calls these on the valid positions, a chunk at a time
(`chunking.py`), and scatters the rows back (`TokenSignals`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__: list[str] = []  # private to taopd.core: scores.py is the public face


def _check_pair(s_logits: Tensor, t_logits: Tensor, k: int) -> None:
    if s_logits.shape != t_logits.shape:
        raise ValueError(
            f"student logits {tuple(s_logits.shape)} and teacher logits {tuple(t_logits.shape)} "
            "differ in shape; align the vocabularies first (vocab_size=len(tokenizer)) and pass "
            "the same positions for both"
        )
    vocab = s_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, vocabulary size {vocab}], got k={k}")


def _xlogy_sum(p: Tensor, logq: Tensor) -> Tensor:
    """Σ_v p(v) log q(v) with 0·log 0 = 0 (positions where p = 0 contribute nothing)."""
    return torch.where(p > 0, p * logq, torch.zeros_like(p)).sum(-1)


def _row_signals(s_logits: Tensor, t_logits: Tensor, k: int, tokens: Tensor | None) -> dict:
    """Signals for rows [N, V] of logits already divided by the temperature."""
    dtype = torch.promote_types(s_logits.dtype, torch.float32)
    x = torch.stack([s_logits.to(dtype), t_logits.to(dtype)], dim=1)
    return _stacked_signals(x, torch.empty_like(x), k, tokens)


def _stacked_signals(x: Tensor, work: Tensor, k: int, tokens: Tensor | None) -> dict:
    """Signals for rows of stacked logits x [N, 2, V] (student, teacher), already divided by the
    temperature, in float32 or wider. Overwrites x with the probabilities and `work` (same shape
    and dtype) with the log-probabilities: two [N, 2, V] buffers, reused by the caller across
    chunks (fresh [N, V] tensors cost page faults on CPU); nothing else of size V is allocated.
    """
    logp = torch.log_softmax(x, dim=-1, out=work)
    prob = torch.exp(logp, out=x)
    ls, lt, ps, pt = logp[:, 0], logp[:, 1], prob[:, 0], prob[:, 1]
    neg_h_s, s_lt, neg_h_t, t_ls = _plogq_rows(prob, logp)
    out = {
        "student_entropy": -neg_h_s,
        "teacher_entropy": -neg_h_t,
        "reverse_kl": neg_h_s - s_lt,
        "forward_kl": neg_h_t - t_ls,
    }
    # A -inf logit gives 0·(-inf) = nan in `_plogq_rows`: redo those rows with 0·log 0 = 0 (and
    # +inf KL where one side has mass the other excludes).
    bad = ~torch.isfinite(logp.sum(-1)).all(-1)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(-1)
        b_ls, b_lt, b_ps, b_pt = ls[idx], lt[idx], ps[idx], pt[idx]
        b_neg_h_s, b_neg_h_t = _xlogy_sum(b_ps, b_ls), _xlogy_sum(b_pt, b_lt)
        out["student_entropy"][idx] = -b_neg_h_s
        out["teacher_entropy"][idx] = -b_neg_h_t
        out["reverse_kl"][idx] = b_neg_h_s - _xlogy_sum(b_ps, b_lt)
        out["forward_kl"][idx] = b_neg_h_t - _xlogy_sum(b_pt, b_ls)
    top = _topk_ids(logp, k)
    ids_s, ids_t = top[:, 0], top[:, 1]  # S^S, S^T
    out["disagreement"], s_in_t = _union_disagreement(
        ids_s, ids_t, lambda i: ls.gather(-1, i), lambda i: lt.gather(-1, i)
    )
    pt_at_s = pt.gather(-1, ids_s)
    out["compatibility"] = pt_at_s.sum(-1)
    out["compatibility_lb"] = _mass_on(pt_at_s, s_in_t)
    out["overlap"] = s_in_t.to(x.dtype).sum(-1) / k
    if tokens is not None:
        idx = tokens.long().unsqueeze(-1)
        out["log_ratio"] = (ls.gather(-1, idx) - lt.gather(-1, idx)).squeeze(-1)
    return out


_TOPK_BLOCK = 64  # block width of `_topk_ids`' first pass


def _topk_ids(x: Tensor, k: int) -> Tensor:
    """Ids of the k largest entries along the last dim (the set `torch.topk` returns).

    Two passes that read x once: the max of each block of 64 ids, then an exact top-k among the
    ids of the k blocks with the largest maxima (the k largest entries lie in those blocks: a
    block outside them has k blocks above it, each holding a larger entry). On CPU, several
    times faster than `topk` over 49,152 ids (benchmarks/README.md). Ties at the k-th value may
    resolve to other ids, as in topk.
    """
    vocab, block = x.shape[-1], _TOPK_BLOCK
    n_blocks = vocab // block
    if n_blocks < 4 * k:  # small vocabularies: nothing to gain
        return x.topk(k, dim=-1).indices
    head = x.narrow(-1, 0, n_blocks * block)
    best = head.unflatten(-1, (n_blocks, block)).amax(-1).topk(k, dim=-1).indices
    ids = (best.unsqueeze(-1) * block + torch.arange(block, device=x.device)).flatten(-2)
    tail = vocab - n_blocks * block
    if tail:  # the last ids, outside every block, are always candidates
        rest = torch.arange(n_blocks * block, vocab, device=x.device)
        ids = torch.cat([ids, rest.expand(*ids.shape[:-1], tail)], dim=-1)
    return ids.gather(-1, x.gather(-1, ids).topk(k, dim=-1).indices)


def _union_disagreement(
    ids_s: Tensor, ids_t: Tensor, log_s_at: Callable, log_t_at: Callable
) -> tuple[Tensor, Tensor]:
    """D_t (Eq. 9) on U = S^S ∪ S^T, and which S^S ids are in S^T ([N, K] bool).

    `log_s_at(ids)` / `log_t_at(ids)` give each model's log-probabilities at ids [N, m]; both
    are renormalized on U before the forward KL (0·log 0 = 0).
    """
    s_in_t = (ids_s.unsqueeze(-1) == ids_t.unsqueeze(-2)).any(-1)  # v ∈ S^S ∩ S^T
    t_in_s = (ids_t.unsqueeze(-1) == ids_s.unsqueeze(-2)).any(-1)
    # U = S^S ∪ S^T as the 2K ids [S^S, S^T] with the duplicates of S^T switched off.
    union_ids = torch.cat([ids_s, ids_t], dim=-1)
    in_union = torch.cat([torch.ones_like(s_in_t), ~t_in_s], dim=-1)
    ls_u = log_s_at(union_ids).masked_fill(~in_union, -math.inf)
    lt_u = log_t_at(union_ids).masked_fill(~in_union, -math.inf)
    ls_u = ls_u - torch.logsumexp(ls_u, dim=-1, keepdim=True)  # log p̄_S on U
    lt_u = lt_u - torch.logsumexp(lt_u, dim=-1, keepdim=True)  # log p̄_T on U
    pt_u = lt_u.exp()
    return _xlogy_sum(pt_u, lt_u) - _xlogy_sum(pt_u, ls_u), s_in_t


def _mass_on(pt_at_s: Tensor, member: Tensor) -> Tensor:
    """Σ_{v∈S^S, member} p_T(v): Ĉ of Eq. 17 (member = v ∈ S^T, or v among the ids known)."""
    return (pt_at_s * member).sum(-1)


def _plogq_rows(prob: Tensor, logp: Tensor) -> Tensor:
    """Σ_v p_i(v) log p_j(v) per row for (i, j) = (S, S), (S, T), (T, T), (T, S): [4, N].

    Inputs [N, 2, V] (student, teacher). One batched [2, V] × [V, 2] product per row reads each
    buffer once: the four sums without the four product temporaries of a mul-then-sum.
    """
    m = torch.bmm(prob, logp.transpose(1, 2))  # [N, 2, 2]: m[n, i, j] = Σ_v p_i log p_j
    return torch.stack([m[:, 0, 0], m[:, 0, 1], m[:, 1, 1], m[:, 1, 0]])


def _topk_rows(
    ls: Tensor, known_ids: Tensor, known_lp: Tensor, k: int, vocab: int
) -> dict[str, Tensor]:
    """Signals of rows from student log-probs ls [N, V] and the teacher's known log-probs.

    known_ids / known_lp [N, R]: ids with exact teacher log-probs (-1 / -inf pad). The teacher's
    missing mass 1 - Σ_known p_T is spread uniformly over the V - R ids it did not return.
    """
    n_known = (known_ids >= 0).sum(-1)
    if bool((n_known < k).any()):
        raise ValueError(f"the teacher returned fewer than k={k} in-vocabulary ids at a position")
    rest = (1.0 - known_lp.exp().sum(-1)).clamp(min=0.0)
    n_rest = (vocab - n_known).to(ls.dtype)
    log_rest = torch.where(
        n_rest > 0, rest.log() - n_rest.clamp(min=1).log(), torch.full_like(rest, -math.inf)
    )

    def log_t_at(ids: Tensor) -> Tensor:
        match = ids.unsqueeze(-1) == known_ids.unsqueeze(-2)  # [N, m, R]
        found = known_lp.unsqueeze(-2).expand_as(match).masked_fill(~match, 0.0).sum(-1)
        return torch.where(match.any(-1), found, log_rest.unsqueeze(-1))

    ids_s = ls.topk(k, dim=-1).indices  # S^S
    ids_t = known_ids.gather(-1, known_lp.topk(k, dim=-1).indices)  # S^T: top-K of the known
    disagreement, s_in_t = _union_disagreement(ids_s, ids_t, lambda i: ls.gather(-1, i), log_t_at)
    s_known = (ids_s.unsqueeze(-1) == known_ids.unsqueeze(-2)).any(-1)
    c_hat = _mass_on(log_t_at(ids_s).exp(), s_known)
    nan = torch.full_like(c_hat, math.nan)
    return {
        "student_entropy": -_xlogy_sum(ls.exp(), ls),
        "teacher_entropy": nan,
        "reverse_kl": nan,
        "forward_kl": nan,
        "disagreement": disagreement,
        "compatibility": c_hat,
        "compatibility_lb": c_hat,
        "overlap": s_in_t.to(ls.dtype).sum(-1) / k,
    }

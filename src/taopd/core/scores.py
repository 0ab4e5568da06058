"""Per-position teacher/student signals (arXiv 2605.26844, Eqs. 9-11, 17).

Imports torch only. Every function works on tensors of shape [..., V] (logits) or [..., d]
(hidden states) with any leading dims, and returns per-position tensors of the leading shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = [
    "HeadSpec",
    "TokenSignals",
    "Workspace",
    "token_signals",
    "signals_from_hidden",
    "signals_from_teacher_topk",
    "topk_signals",
    "TOPK_UNAVAILABLE",
    "normalize",
    "quantile",
    "teachability",
    "teachability_of",
    "trim_vocab",
]

EPS = 1e-8
TOPK_UNAVAILABLE = ("teacher_entropy", "reverse_kl", "forward_kl")
"""Signals a teacher that returns only its top-k cannot give: NaN in `signals_from_teacher_topk`."""


@dataclass
class TokenSignals:
    """Per-position signals, each of the leading shape of the logits (never [..., V]).

    Invalid positions hold 0. Natural-log units throughout.
    """

    student_entropy: Tensor  # H_t, full vocabulary
    teacher_entropy: Tensor
    reverse_kl: Tensor  # KL(p_S || p_T), Eq. 6
    forward_kl: Tensor  # KL(p_T || p_S)
    disagreement: Tensor  # D_t, forward KL on U = S^S ∪ S^T after renormalizing (Eq. 9)
    compatibility: Tensor  # C_t = Σ_{v∈S^S} p_T(v) (Eq. 10)
    compatibility_lb: Tensor  # Ĉ_t = Σ_{v∈S^S∩S^T} p_T(v) (Eq. 17)
    overlap: Tensor  # |S^S ∩ S^T| / K, teacher/student top-K overlap
    log_ratio: Tensor | None = None  # log p_S(y_t) - log p_T(y_t), sampled-token estimator

    def items(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) pairs of the signals that are present."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                yield f.name, value

    def as_dict(self) -> dict[str, Tensor]:
        return dict(self.items())


def trim_vocab(x: Tensor, vocab_size: int | None, dim: int = -1) -> Tensor:
    """First `vocab_size` entries of `dim`: logits [..., V] (dim=-1) or an lm_head [V, d] (dim=0).

    Padded lm_heads (Qwen2.5 7B: 152,064 rows, 1.5B: 151,936) share the tokenizer's ids below
    len(tokenizer); rows above are padding and are dropped so both sides score the same ids.
    """
    if vocab_size is None:
        return x
    if x.shape[dim] < vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the {x.shape[dim]} vocabulary entries present"
        )
    return x.narrow(dim, 0, vocab_size)


@dataclass(frozen=True)
class HeadSpec:
    """What a model's head adds to h·Wᵀ: logits = softcap(scale · (h·Wᵀ + bias)).

    bias: the lm_head bias [V] (GPT-J, Phi-2); scale: a logit multiplier (Cohere's `logit_scale`,
    Granite's 1/`logits_scaling`); softcap: c·tanh(x/c) on the scaled logits (Gemma 2's
    `final_logit_softcapping`). The order is the one transformers' models apply them in.
    """

    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"head scale must be a number, got {self.scale!r}")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"head scale must be finite and non-zero, got {self.scale}")
        cap = self.softcap
        if cap is not None and not (
            isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0
        ):
            raise ValueError(f"head softcap must be a positive number or None, got {cap!r}")
        if self.bias is not None and self.bias.dim() != 1:
            raise ValueError(f"head bias must be [V], got shape {tuple(self.bias.shape)}")

    @property
    def is_plain(self) -> bool:
        """True when logits are exactly h·Wᵀ."""
        return self.bias is None and self.scale == 1.0 and self.softcap is None

    def trimmed(self, vocab_size: int | None) -> HeadSpec:
        """The spec with its bias cut to the first `vocab_size` ids (see `trim_vocab`)."""
        if self.bias is None or vocab_size is None:
            return self
        return HeadSpec(trim_vocab(self.bias, vocab_size), self.scale, self.softcap)

    def check(self, vocab: int, role: str) -> None:
        if self.bias is not None and self.bias.shape[0] != vocab:
            raise ValueError(
                f"{role} head bias has {self.bias.shape[0]} entries, its lm_head {vocab} rows"
            )

    def apply(self, z: Tensor, inplace: bool = False) -> Tensor:
        """The logits from z = h·Wᵀ [..., V] (in place when `inplace`; differentiable if not)."""
        if self.bias is not None:
            b = self.bias.to(device=z.device, dtype=z.dtype)
            z = z.add_(b) if inplace else z + b
        if self.scale != 1.0:
            z = z.mul_(self.scale) if inplace else z * self.scale
        if self.softcap is not None:
            c = self.softcap
            z = z.div_(c).tanh_().mul_(c) if inplace else torch.tanh(z / c) * c
        return z


PLAIN_HEAD = HeadSpec()


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


class Workspace:
    """Buffers that chunked scoring reuses across calls (hold one per training run).

    A fresh [chunk, 2, V] float32 buffer is zero-filled by the kernel page by page on first touch
    (on CPU, two 200 MB buffers a step on SmolLM2 shapes: the profile's matmul and log-softmax
    time fell by ~0.6 s a step once they were kept, benchmarks/README.md). Passing the same
    workspace to every call keeps them resident; `nbytes` says how much it holds, `clear()`
    frees it. On CUDA the caching allocator already reuses memory.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        """A tensor of `shape` backed by the buffer `name`, grown (re-allocated) when too small."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)  # free the old one before allocating its successor
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


def _buffer(
    workspace: Workspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, device
) -> Tensor:
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.get(name, shape, dtype, device)


def _project(h: Tensor, weight: Tensor, out: Tensor, dtype: torch.dtype | None = None) -> None:
    """out[:] = h @ weight.T on out's device and dtype, in place when nothing needs converting.

    `dtype` (e.g. torch.bfloat16) runs the matmul in that precision; the result is stored in
    out's dtype (float32), where the softmaxes and sums happen.
    """
    h = h.to(weight.device)
    if dtype is not None and (h.dtype != dtype or weight.dtype != dtype):
        out.copy_(h.to(dtype) @ weight.T.to(dtype))
    elif h.dtype == weight.dtype == out.dtype and h.device == out.device:
        torch.mm(h, weight.T, out=out)
    else:
        out.copy_(h @ weight.T.to(h.dtype))


def _valid_mask(lead: torch.Size, valid: Tensor | None, device: torch.device) -> Tensor:
    if valid is None:
        return torch.ones(lead, dtype=torch.bool, device=device)
    if tuple(valid.shape) != tuple(lead):
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {tuple(lead)}")
    return valid.to(device=device, dtype=torch.bool)


def _assemble(
    lead: torch.Size, valid: Tensor, rows: list[dict], device: torch.device, dtype: torch.dtype
) -> TokenSignals:
    """Scatter per-row results of the valid positions back into zero-filled [lead] tensors."""
    flat_valid = valid.reshape(-1)
    names = rows[0].keys() if rows else [f.name for f in fields(TokenSignals)][:-1]
    result = {}
    for name in names:
        full = torch.zeros(flat_valid.numel(), dtype=dtype, device=device)
        if rows:
            full[flat_valid] = torch.cat([r[name] for r in rows]).to(dtype)
        result[name] = full.reshape(lead)
    return TokenSignals(**result)


@torch.no_grad()
def token_signals(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tokens: Tensor | None = None,
    k: int = 16,
    valid: Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> TokenSignals:
    """All per-position signals from full logits [..., V] of both models (no gradient).

    `tokens` (the sampled ids, shape [...]) adds the sampled-token log-ratio. `vocab_size` trims
    padded vocabularies to the shared tokenizer length. Invalid positions are skipped and hold 0.
    """
    student_logits = trim_vocab(student_logits, vocab_size)
    teacher_logits = trim_vocab(teacher_logits, vocab_size)
    _check_pair(student_logits, teacher_logits, k)
    lead = student_logits.shape[:-1]
    device = student_logits.device
    valid = _valid_mask(lead, valid, device)
    flat_valid = valid.reshape(-1)
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)[flat_valid] / temperature
    t = teacher_logits.reshape(-1, vocab)[flat_valid] / temperature
    tok = tokens.reshape(-1)[flat_valid] if tokens is not None else None
    rows = [_row_signals(s, t, k, tok)] if s.shape[0] else []
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    sig = _assemble(lead, valid, rows, device, dtype)
    if tokens is not None and sig.log_ratio is None:
        sig.log_ratio = torch.zeros(lead, dtype=dtype, device=device)
    return sig


@torch.no_grad()
def signals_from_hidden(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    tokens: Tensor | None = None,
    k: int = 16,
    valid: Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int = 512,
    projection_dtype: torch.dtype | None = None,
    student_head: HeadSpec = PLAIN_HEAD,
    teacher_head: HeadSpec = PLAIN_HEAD,
    workspace: Workspace | None = None,
) -> TokenSignals:
    """The signals of `token_signals`, from hidden states [..., d] and lm_head weights [V, d].

    `student_head` / `teacher_head` add each model's lm_head bias, logit scale and final-logit
    softcapping (`HeadSpec`), applied in float32 before the temperature, as the dense logits do.

    Projects `chunk_size` valid positions at a time, so at most [chunk_size, V] logits exist;
    hidden states are detached (scoring never carries gradient). `projection_dtype`
    (torch.bfloat16) runs the two vocabulary projections in lower precision, faster on CPUs with
    bf16 units; softmaxes, top-K and sums stay in float32. `workspace` (`Workspace`) keeps the
    two [chunk_size, 2, V] buffers across calls instead of allocating them every call.
    """
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
            f"{tuple(teacher_hidden.shape)} must cover the same positions"
        )
    w_s = trim_vocab(student_weight, vocab_size, dim=0).detach()
    w_t = trim_vocab(teacher_weight, vocab_size, dim=0).detach()
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(
            f"student lm_head has {w_s.shape[0]} rows and teacher lm_head {w_t.shape[0]}; "
            "pass vocab_size=len(tokenizer) to align padded vocabularies"
        )
    if not 1 <= k <= w_s.shape[0]:
        raise ValueError(f"k must be in [1, vocabulary size {w_s.shape[0]}], got k={k}")
    student_head = student_head.trimmed(vocab_size)
    teacher_head = teacher_head.trimmed(vocab_size)
    student_head.check(w_s.shape[0], "student")
    teacher_head.check(w_t.shape[0], "teacher")
    if projection_dtype is not None:  # cast the heads once per call, not once per chunk
        w_s, w_t = w_s.to(projection_dtype), w_t.to(projection_dtype)
    lead = student_hidden.shape[:-1]
    device = student_hidden.device
    valid = _valid_mask(lead, valid, device)
    flat_valid = valid.reshape(-1)
    h_s = student_hidden.detach().reshape(-1, student_hidden.shape[-1])[flat_valid]
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[flat_valid]
    tok = tokens.reshape(-1)[flat_valid] if tokens is not None else None
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    n_rows, rows = h_s.shape[0], []
    if n_rows:  # one workspace for all chunks: fresh [chunk, V] tensors cost page faults on CPU
        shape = (min(chunk_size, n_rows), 2, w_s.shape[0])
        x_buf = _buffer(workspace, "logits", shape, dtype, device)
        work = _buffer(workspace, "logp", shape, dtype, device)
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        x = x_buf[: end - start]
        _project(h_s[start:end], w_s, x[:, 0], projection_dtype)
        _project(h_t[start:end], w_t, x[:, 1], projection_dtype)
        if not student_head.is_plain:
            student_head.apply(x[:, 0], inplace=True)
        if not teacher_head.is_plain:
            teacher_head.apply(x[:, 1], inplace=True)
        if temperature != 1.0:
            x.div_(temperature)
        rows.append(
            _stacked_signals(x, work[: end - start], k, tok[start:end] if tok is not None else None)
        )
    sig = _assemble(lead, valid, rows, device, dtype)
    if tokens is not None and sig.log_ratio is None:
        sig.log_ratio = torch.zeros(lead, dtype=dtype, device=device)
    return sig


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


@torch.no_grad()
def signals_from_teacher_topk(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    token_teacher_logprob: Tensor,
    tokens: Tensor,
    k: int = 16,
    valid: Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 512,
    projection_dtype: torch.dtype | None = None,
    workspace: Workspace | None = None,
) -> TokenSignals:
    """Signals when the teacher gives log-probs only on some ids (a top-k server, Eq. 17).

    teacher_ids / teacher_logprobs [..., R]: the ids the teacher returned (its top-k, R >= k;
    -1 / -inf pad) with exact log-probs; token_teacher_logprob [...]: log p_T(y_t) of `tokens`.
    Exact: student_entropy, overlap (S^T = top-K of the returned ids), log_ratio.
    compatibility = compatibility_lb = Ĉ = Σ p_T over S^S ids the teacher returned (Eq. 17's
    lower bound of C; C itself when R = V). disagreement: D on U = S^S ∪ S^T with p_T of ids
    outside the returned set taken as the missing mass spread uniformly over them (exact when
    R = V). teacher_entropy, reverse_kl, forward_kl: NaN (TOPK_UNAVAILABLE). Temperature 1.
    `workspace`: as in `signals_from_hidden`.
    """
    w_s = trim_vocab(student_weight, vocab_size, dim=0).detach()
    vocab = w_s.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, vocabulary size {vocab}], got k={k}")
    lead = student_hidden.shape[:-1]
    if teacher_ids.shape[:-1] != lead or teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher ids {tuple(teacher_ids.shape)} and log-probs "
            f"{tuple(teacher_logprobs.shape)} must be [{', '.join(map(str, lead))}, R]"
        )
    if projection_dtype is not None:
        w_s = w_s.to(projection_dtype)
    device = student_hidden.device
    valid = _valid_mask(lead, valid, device)
    flat_valid = valid.reshape(-1)
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    h_s = student_hidden.detach().reshape(-1, student_hidden.shape[-1])[flat_valid]
    r = teacher_ids.shape[-1]
    t_ids = teacher_ids.to(device).reshape(-1, r)[flat_valid].long()
    t_lp = teacher_logprobs.to(device=device, dtype=dtype).reshape(-1, r)[flat_valid]
    t_lp = t_lp.masked_fill(t_ids < 0, -math.inf)
    tok = tokens.to(device).reshape(-1)[flat_valid].long()
    t_tok = token_teacher_logprob.to(device=device, dtype=dtype).reshape(-1)[flat_valid]
    rows = []
    n_rows = h_s.shape[0]
    if n_rows:
        logits = _buffer(workspace, "logits", (min(chunk_size, n_rows), vocab), dtype, device)
    for start in range(0, n_rows, chunk_size):
        sl = slice(start, min(start + chunk_size, n_rows))
        x = logits[: sl.stop - start]
        _project(h_s[sl], w_s, x, projection_dtype)
        ls = torch.log_softmax(x, dim=-1)
        row = _topk_rows(ls, t_ids[sl], t_lp[sl], k, vocab)
        row["log_ratio"] = ls.gather(-1, tok[sl].unsqueeze(-1)).squeeze(-1) - t_tok[sl]
        rows.append(row)
    sig = _assemble(lead, valid, rows, device, dtype)
    if not rows:
        sig.log_ratio = torch.zeros(lead, dtype=dtype, device=device)
    for name in TOPK_UNAVAILABLE:  # not available anywhere, valid or not
        setattr(sig, name, torch.full(lead, math.nan, dtype=dtype, device=device))
    return sig


@torch.no_grad()
def topk_signals(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    k: int = 16,
    valid: Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> TokenSignals:
    """D (Eq. 9) and the bound Ĉ (Eq. 17) from student logits and a teacher's top-k answer.

    For servers that return only the teacher's top-k per position (verl, TRL's server paths):
    student_logits [..., V]; teacher_ids / teacher_logprobs [..., R] (R >= k; -1 / -inf pad), the
    teacher's log-probs as served (its own temperature). compatibility = compatibility_lb = Ĉ;
    disagreement and Ĉ are exact when R = V (see `signals_from_teacher_topk` for the rule on ids
    the teacher did not return). student_entropy and overlap are exact; teacher_entropy,
    reverse_kl and forward_kl are NaN (TOPK_UNAVAILABLE); no log_ratio (no sampled tokens).
    """
    student_logits = trim_vocab(student_logits, vocab_size)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, vocabulary size {vocab}], got k={k}")
    if teacher_ids.shape[:-1] != lead or teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher ids {tuple(teacher_ids.shape)} and log-probs "
            f"{tuple(teacher_logprobs.shape)} must be [{', '.join(map(str, lead))}, R]"
        )
    device = student_logits.device
    valid = _valid_mask(lead, valid, device)
    flat_valid = valid.reshape(-1)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    r = teacher_ids.shape[-1]
    t_ids = teacher_ids.to(device).reshape(-1, r)[flat_valid].long()
    if bool((t_ids >= vocab).any()):
        raise ValueError(f"teacher ids must be < the vocabulary size {vocab} (or -1 as padding)")
    t_lp = teacher_logprobs.to(device=device, dtype=dtype).reshape(-1, r)[flat_valid]
    t_lp = t_lp.masked_fill(t_ids < 0, -math.inf)
    s = student_logits.reshape(-1, vocab)[flat_valid].to(dtype) / temperature
    rows = []
    if s.shape[0]:
        rows.append(_topk_rows(torch.log_softmax(s, dim=-1), t_ids, t_lp, k, vocab))
    sig = _assemble(lead, valid, rows, device, dtype)
    for name in TOPK_UNAVAILABLE:
        setattr(sig, name, torch.full(lead, math.nan, dtype=dtype, device=device))
    return sig


def quantile(values: Tensor, q: float) -> Tensor:
    """q-quantile of a 1-D tensor with linear interpolation (as numpy's default).

    Sort-based, so it has no size limit (torch.quantile refuses inputs over 16M elements).
    """
    if values.numel() == 0:
        raise ValueError("quantile of an empty tensor")
    ordered = values.sort().values
    pos = q * (ordered.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    frac = pos - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac


def normalize(
    z: Tensor,
    valid: Tensor | None = None,
    low: float = 0.05,
    high: float = 0.95,
    eps: float = EPS,
) -> Tensor:
    """Batch quantile normalization, Eq. 11: clip((z - Q_low) / (Q_high - Q_low + eps), 0, 1).

    Quantiles are taken over the valid positions of the call (the rollout batch); non-finite
    scores become 0 first; invalid positions return 0.
    """
    valid = _valid_mask(z.shape, valid, z.device)
    z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    if not bool(valid.any()):
        return torch.zeros_like(z)
    pool = z[valid]
    q_lo, q_hi = quantile(pool, low), quantile(pool, high)
    out = ((z - q_lo) / (q_hi - q_lo + eps)).clamp(0.0, 1.0)
    return out.masked_fill(~valid, 0.0)


def teachability(
    student_logits: Tensor,
    teacher_logits: Tensor,
    k: int = 16,
    valid: Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> Tensor:
    """Teachability s = D̃ · C̃ (Eq. 12, "learnable disagreement" D^L) per position.

    D̃, C̃ are quantile-normalized over the valid positions of the call; invalid positions score 0.
    """
    sig = token_signals(
        student_logits,
        teacher_logits,
        k=k,
        valid=valid,
        temperature=temperature,
        vocab_size=vocab_size,
    )
    return teachability_of(sig, valid)


def teachability_of(sig: TokenSignals, valid: Tensor | None = None) -> Tensor:
    """s = D̃ · C̃ (Eq. 12) from computed signals, normalized over the valid positions (Eq. 11)."""
    valid = _valid_mask(sig.disagreement.shape, valid, sig.disagreement.device)
    return normalize(sig.disagreement, valid) * normalize(sig.compatibility, valid)

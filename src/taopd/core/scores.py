"""Per-position teacher/student signals (arXiv 2605.26844, Eqs. 9-11, 17).

The public face of the signals: the per-row kernels are in `row_signals.py`, the chunked loops
and their buffers (`Workspace`) in `chunking.py`. Imports torch only. Every function works on
tensors of shape [..., V] (logits) or [..., d] (hidden states) with any leading dims, and
returns per-position tensors of the leading shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .chunking import Workspace, stacked_chunks, topk_chunks
from .row_signals import _check_pair, _row_signals, _topk_rows
from .row_signals import _topk_ids as _topk_ids  # importable from here, as before the split

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
OPTIONAL = ("log_ratio", "relative_position")
"""`TokenSignals` fields that a scoring pass may leave out (None)."""
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
    # t / T_i: the position's index among its rollout's valid positions over their count; None =
    # derived from the valid mask's rows (set it where rows are flattened, e.g. a diagnostic bank)
    relative_position: Tensor | None = None

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
    names = (
        rows[0].keys() if rows else [f.name for f in fields(TokenSignals) if f.name not in OPTIONAL]
    )
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
    w_s, w_t, heads = _aligned_heads(
        student_weight, teacher_weight, k, vocab_size, (student_head, teacher_head)
    )
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
    rows = stacked_chunks(
        h_s, h_t, w_s, w_t, heads, tok, k, temperature, chunk_size, projection_dtype, workspace,
        dtype,
    )  # fmt: skip
    sig = _assemble(lead, valid, rows, device, dtype)
    if tokens is not None and sig.log_ratio is None:
        sig.log_ratio = torch.zeros(lead, dtype=dtype, device=device)
    return sig


def _aligned_heads(
    student_weight: Tensor,
    teacher_weight: Tensor,
    k: int,
    vocab_size: int | None,
    heads: tuple[HeadSpec, HeadSpec],
) -> tuple[Tensor, Tensor, tuple[HeadSpec, HeadSpec]]:
    """Both lm_head weights trimmed to `vocab_size` and detached, and their `HeadSpec`s trimmed
    alike; checks the rows agree and `k` fits."""
    w_s = trim_vocab(student_weight, vocab_size, dim=0).detach()
    w_t = trim_vocab(teacher_weight, vocab_size, dim=0).detach()
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(
            f"student lm_head has {w_s.shape[0]} rows and teacher lm_head {w_t.shape[0]}; "
            "pass vocab_size=len(tokenizer) to align padded vocabularies"
        )
    if not 1 <= k <= w_s.shape[0]:
        raise ValueError(f"k must be in [1, vocabulary size {w_s.shape[0]}], got k={k}")
    student_head = heads[0].trimmed(vocab_size)
    teacher_head = heads[1].trimmed(vocab_size)
    student_head.check(w_s.shape[0], "student")
    teacher_head.check(w_t.shape[0], "teacher")
    return w_s, w_t, (student_head, teacher_head)


def _flat_teacher(
    teacher_ids: Tensor, teacher_logprobs: Tensor, flat_valid: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """A top-k teacher's ids and log-probs at the valid positions [N, R] (pads at -inf)."""
    device, r = flat_valid.device, teacher_ids.shape[-1]
    t_ids = teacher_ids.to(device).reshape(-1, r)[flat_valid].long()
    t_lp = teacher_logprobs.to(device=device, dtype=dtype).reshape(-1, r)[flat_valid]
    return t_ids, t_lp.masked_fill(t_ids < 0, -math.inf)


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
    t_ids, t_lp = _flat_teacher(teacher_ids, teacher_logprobs, flat_valid, dtype)
    tok = tokens.to(device).reshape(-1)[flat_valid].long()
    t_tok = token_teacher_logprob.to(device=device, dtype=dtype).reshape(-1)[flat_valid]
    teacher = (t_ids, t_lp, t_tok)
    rows = topk_chunks(h_s, w_s, teacher, tok, k, chunk_size, projection_dtype, workspace, dtype)
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
    t_ids, t_lp = _flat_teacher(teacher_ids, teacher_logprobs, flat_valid, dtype)
    if bool((t_ids >= vocab).any()):
        raise ValueError(f"teacher ids must be < the vocabulary size {vocab} (or -1 as padding)")
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

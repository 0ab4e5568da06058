"""OPD losses on selected positions (Eqs. 6-7): dense logits or a selective lm_head.

Imports torch only. One per-token implementation (`per_token_loss`) serves both forms; the
selective head projects only the kept rows through the vocabulary, chunk by chunk, with gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .scores import PLAIN_HEAD, HeadSpec, trim_vocab

__all__ = ["LOSS_KINDS", "per_token_loss", "opd_loss", "selective_head_loss", "row_weights"]

LOSS_KINDS = ("reverse_kl", "forward_kl", "jsd", "pg")
"""`opd_loss` kinds: reverse KL (Eq. 6), forward KL, generalized JSD, sampled-token PG (Eq. 7)."""
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # kind 'pg': PPO-style ratio clipping (the authors' values)


def _masked_kl(p: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
    """Σ_v p(v)(log p(v) - log q(v)) with 0·log 0 = 0, safe to differentiate at -inf logits."""
    live = p > 0
    logp = torch.where(live, logp, torch.zeros_like(logp))
    logq = torch.where(live, logq, torch.zeros_like(logq))
    return (p * (logp - logq)).sum(-1)


def per_token_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "reverse_kl",
    tokens: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    old_logprobs: Tensor | None = None,
    clip_low: float = CLIP_LOW,
    clip_high: float = CLIP_HIGH,
) -> Tensor:
    """Per-row loss [N] from logits [N, V]; the teacher is always detached.

    reverse_kl: KL(p_S‖p_T) (Eq. 6, the default). forward_kl: KL(p_T‖p_S). jsd: generalized JSD,
    β·KL(p_T‖m) + (1-β)·KL(p_S‖m) with m = β·p_T + (1-β)·p_S, β in (0, 1). pg: the sampled-token
    estimator as policy gradient (Eq. 7), advantage A = -(log p_S(y) - log p_T(y)) detached, loss
    -min(r·A, clip(r, 1-clip_low, 1+clip_high)·A) with r = p_S(y)/p_old(y) (r = 1 on-policy).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    ls = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    if kind == "reverse_kl":
        return _masked_kl(ls.exp(), ls, lt)
    if kind == "forward_kl":
        return _masked_kl(lt.exp(), lt, ls)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1) for kind='jsd', got {beta}")
        a, b = lt + math.log(beta), ls + math.log(1 - beta)
        dead = torch.isneginf(a) & torch.isneginf(b)  # ids both models exclude: m = 0 there
        a, b = a.masked_fill(dead, 0.0), b.masked_fill(dead, 0.0)
        lm = torch.logsumexp(torch.stack([a, b]), dim=0).masked_fill(dead, -math.inf)
        return beta * _masked_kl(lt.exp(), lt, lm) + (1 - beta) * _masked_kl(ls.exp(), ls, lm)
    if kind == "pg":
        if tokens is None:
            raise ValueError("kind='pg' needs the sampled token ids (tokens=...)")
        idx = tokens.long().unsqueeze(-1)
        return _pg_loss(
            ls, lt.gather(-1, idx).squeeze(-1), tokens, old_logprobs, clip_low, clip_high
        )
    raise ValueError(f"kind must be one of {', '.join(LOSS_KINDS)}; got {kind!r}")


def _pg_loss(
    ls: Tensor,
    teacher_token_logprob: Tensor,
    tokens: Tensor,
    old_logprobs: Tensor | None,
    clip_low: float,
    clip_high: float,
) -> Tensor:
    """The 'pg' loss per row from student log-probs ls [N, V] and log p_T(y) [N] (see above)."""
    logp = ls.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    advantage = -(logp - teacher_token_logprob.detach().to(ls.dtype)).detach()
    old = logp.detach() if old_logprobs is None else old_logprobs.to(ls.dtype)
    ratio = torch.exp(logp - old)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return -torch.minimum(ratio * advantage, clipped * advantage)


def row_weights(
    mask: Tensor,
    reduction: str = "token",
    normalizer: float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Flat indices of the kept positions and the weight of each in the loss Σ_i w_i ℓ_i.

    reduction="token" (the paper's L = Σ m_t ℓ_t / Σ m_t): w = 1/normalizer, normalizer defaulting
    to the number of kept positions. reduction="sequence" (the released code): mean over each
    sequence's kept positions (last dim), then over sequences; normalizer = number of sequences
    with a kept position. For gradient accumulation pass the whole batch's normalizer to every
    micro-batch: the micro-batch losses then sum to the whole-batch loss.
    `token_weights` (mask's shape, or [n]) scale each kept row: Σ_t m_t w_t ℓ_t / normalizer.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    rows = flat.nonzero().squeeze(-1)
    n = rows.numel()
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    if reduction == "token":
        denom = float(normalizer) if normalizer is not None else float(n)
        weights = torch.full(
            (n,), 1.0 / denom if denom else 0.0, dtype=torch.float64, device=mask.device
        )
    elif reduction == "sequence":
        per_seq = mask.reshape(-1, mask.shape[-1]).sum(-1)
        seq_of_row = rows // mask.shape[-1]
        n_seq = float(normalizer) if normalizer is not None else float((per_seq > 0).sum())
        weights = 1.0 / (per_seq[seq_of_row].to(torch.float64) * max(n_seq, 1.0))
    else:
        raise ValueError(f"reduction must be 'token' or 'sequence', got {reduction!r}")
    if n == 0 and normalizer is None:
        raise ValueError(
            "the mask selects no positions: nothing to train on (check the valid/response mask, "
            "or pass normalizer= for an empty micro-batch of a larger batch)"
        )
    if token_weights is not None:
        tw = _rows(token_weights.detach(), mask, rows).to(weights.device, torch.float64)
        if not bool(torch.isfinite(tw).all() & (tw >= 0).all()):
            raise ValueError("token_weights must be finite and >= 0 at the kept positions")
        weights = weights * tw
    return rows, weights


def _rows(x: Tensor | None, mask: Tensor, rows: Tensor) -> Tensor | None:
    """Kept rows of a per-position tensor [*mask.shape, ...] (or x itself if already [n, ...])."""
    if x is None:
        return None
    if tuple(x.shape[: mask.dim()]) == tuple(mask.shape):
        return x.reshape(mask.numel(), *x.shape[mask.dim() :])[rows]
    if x.shape[0] == rows.numel():
        return x
    raise ValueError(
        f"expected shape {tuple(mask.shape)}[...] or [{rows.numel()}, ...], got {tuple(x.shape)}"
    )


def opd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    kind: str = "reverse_kl",
    tokens: Tensor | None = None,
    normalizer: float | None = None,
    reduction: str = "token",
    beta: float = 0.5,
    temperature: float = 1.0,
    old_logprobs: Tensor | None = None,
    vocab_size: int | None = None,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Budgeted OPD loss L = Σ_t m_t ℓ_t / Σ_t m_t (Eq. 7) from full logits [..., V].

    Only the kept rows enter the loss; see `row_weights` (normalization, token_weights).
    """
    student_logits = trim_vocab(student_logits, vocab_size)
    teacher_logits = trim_vocab(teacher_logits, vocab_size)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; pass vocab_size=len(tokenizer)"
        )
    lead = student_logits.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=student_logits.device)
    rows, weights = row_weights(mask, reduction, normalizer, token_weights)
    vocab = student_logits.shape[-1]
    if rows.numel() == 0:
        return student_logits.reshape(-1)[:1].sum() * 0.0
    per = per_token_loss(
        student_logits.reshape(-1, vocab)[rows],
        teacher_logits.reshape(-1, vocab)[rows],
        kind,
        tokens=_rows(tokens, mask, rows),
        beta=beta,
        temperature=temperature,
        old_logprobs=_rows(old_logprobs, mask, rows),
    )
    return (per * weights.to(per.dtype)).sum()


def _reverse_kl_value_and_grad(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Σ_i w_i KL(p_S‖p_T)_i of rows [n, V] and its gradient wrt the student logits, no autograd.

    ∂/∂z_v = w_i p_S(v) (log p_S(v) - log p_T(v) - KL_i) / T, and 0 where p_S(v) = 0: the
    gradient `per_token_loss(kind="reverse_kl")` gets from autograd, in about 5 [n, V] buffers
    instead of the dozen autograd keeps. The loss value is computed with the same operations.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    ls = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    ps = ls.exp()
    dead = ~(ps > 0)  # 0·log 0 = 0: these ids neither add to the KL nor get a gradient
    grad = ls.sub_(lt).masked_fill_(dead, 0.0)  # log p_S - log p_T on live ids (ls reused)
    del lt
    per = (ps * grad).sum(-1)  # = _masked_kl(ps, ls, lt), the same values summed the same way
    w = weights.to(per.dtype)
    grad.sub_(per.unsqueeze(-1)).mul_(ps).masked_fill_(dead, 0.0)
    grad.mul_((w / temperature).unsqueeze(-1))
    return (per * w).sum(), grad.to(student_logits.dtype)


def _head_jacobian(pre: Tensor, head: HeadSpec) -> Tensor | float:
    """d logits / d (h·Wᵀ + b) elementwise for logits = softcap(scale · (h·Wᵀ + b))."""
    if head.softcap is None:
        return head.scale
    t = torch.tanh(pre * (head.scale / head.softcap))
    return head.scale * (1.0 - t * t)


class _FusedHeadLoss(torch.autograd.Function):
    """Σ_i w_i ℓ_i over kept rows, projecting `chunk` rows at a time; gradients computed in the
    forward pass, chunk by chunk, so no [n, V] logits with autograd history are ever kept.

    The head's bias, scale and softcap (`HeadSpec`) apply to each chunk's h·Wᵀ; the bias (an
    input here, so it gets its gradient) is `bias`, the spec's own bias is ignored."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        head: HeadSpec,
        chunk_loss: Callable,
        chunk: int,
        chunk_value_and_grad: Callable | None = None,
    ) -> Tensor:
        nobias = HeadSpec(None, head.scale, head.softcap)
        grad_h = torch.zeros_like(hidden)
        grad_w = None  # [V, d]: the first chunk's gradient, then summed into (no zeros copy)
        grad_b = None
        want_b = bias is not None and bias.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            if chunk_value_and_grad is not None:  # closed-form gradient wrt the logits
                h, w = hidden[sl].detach(), weight.detach()
                pre = h @ w.T
                if bias is not None:
                    pre = pre + bias.detach().to(pre.dtype)
                logits = pre if nobias.is_plain else nobias.apply(pre)
                loss, g = chunk_value_and_grad(logits, sl)
                if not nobias.is_plain:
                    g = g * _head_jacobian(pre, nobias)
                grads = [g @ w, g.T @ h if weight.requires_grad else None]
                grads.append(g.sum(0) if want_b else None)
            else:
                with torch.enable_grad():
                    h = hidden[sl].detach().requires_grad_(True)
                    w = weight.detach().requires_grad_(weight.requires_grad)
                    b = bias.detach().requires_grad_(want_b) if bias is not None else None
                    pre = h @ w.T
                    if b is not None:
                        pre = pre + b.to(pre.dtype)
                    loss = chunk_loss(nobias.apply(pre), sl)
                    inputs = [h] + ([w] if weight.requires_grad else []) + ([b] if want_b else [])
                    got = list(torch.autograd.grad(loss, inputs))
                    grads = [got.pop(0)]
                    grads.append(got.pop(0) if weight.requires_grad else None)
                    grads.append(got.pop(0) if want_b else None)
            grad_h[sl] = grads[0]
            if weight.requires_grad:
                grad_w = grads[1] if grad_w is None else grad_w.add_(grads[1])
            if want_b:
                grad_b = grads[2] if grad_b is None else grad_b.add_(grads[2])
            total = total + loss.detach().float()
        if weight.requires_grad and grad_w is None:
            grad_w = torch.zeros_like(weight)
        if want_b:
            grad_b = torch.zeros_like(bias) if grad_b is None else grad_b.to(bias.dtype)
        saved = [grad_h] + ([grad_w] if grad_w is not None else [])
        saved += [grad_b] if grad_b is not None else []
        ctx.save_for_backward(*saved)
        ctx.has_w, ctx.has_b = grad_w is not None, grad_b is not None
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = list(ctx.saved_tensors)
        g_h = saved.pop(0)
        g_w = saved.pop(0) if ctx.has_w else None
        g_b = saved.pop(0) if ctx.has_b else None
        if not bool(grad_out == 1):  # loss.backward() skips a [V, d] copy of the head's gradient
            g_h = g_h * grad_out.to(g_h.dtype)
            g_w = g_w * grad_out.to(g_w.dtype) if g_w is not None else None
            g_b = g_b * grad_out.to(g_b.dtype) if g_b is not None else None
        return g_h, g_w, g_b, None, None, None, None


def _check_teacher_inputs(
    teacher_logits: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_token_logprobs: Tensor | None,
    kind: str,
    chunk_size: int,
) -> None:
    """`selective_head_loss` takes exactly one teacher form, a known kind and a positive chunk."""
    given = [
        teacher_logits is not None,
        teacher_hidden is not None and teacher_weight is not None,
        teacher_token_logprobs is not None,
    ]
    if sum(given) != 1:
        raise ValueError(
            "pass exactly one teacher: teacher_logits, both teacher_hidden and teacher_weight, "
            "or teacher_token_logprobs (kind 'pg')"
        )
    if teacher_token_logprobs is not None and kind != "pg":
        raise ValueError(f"teacher_token_logprobs serves kind 'pg' only, not {kind!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {', '.join(LOSS_KINDS)}; got {kind!r}")


def _teacher_chunks(
    teacher_logits: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_head: HeadSpec,
    mask: Tensor,
    rows: Tensor,
    vocab_size: int | None,
    n_vocab: int,
    device: torch.device,
) -> Callable[[slice], Tensor]:
    """The teacher's logits of a chunk of kept rows: sliced from given logits, or projected
    from its hidden states through its lm_head (and head spec) at those rows only, no grad."""
    if teacher_logits is not None and not teacher_head.is_plain:
        raise ValueError("teacher_head applies to teacher_hidden; teacher_logits are final logits")
    if teacher_logits is not None:
        t_rows = _rows(trim_vocab(teacher_logits, vocab_size).detach(), mask, rows)
        if t_rows.shape[-1] != n_vocab:
            raise ValueError(
                f"teacher logits have {t_rows.shape[-1]} columns, student lm_head {n_vocab} "
                "rows; pass vocab_size=len(tokenizer)"
            )
        return lambda sl: t_rows[sl]
    assert teacher_hidden is not None and teacher_weight is not None
    w_t = trim_vocab(teacher_weight, vocab_size, dim=0).detach()
    if w_t.shape[0] != n_vocab:
        raise ValueError(
            f"teacher lm_head has {w_t.shape[0]} rows, student {n_vocab}; "
            "pass vocab_size=len(tokenizer)"
        )
    teacher_head.check(w_t.shape[0], "teacher")
    ht_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[rows]

    def teacher_chunk(sl: slice) -> Tensor:
        h = ht_rows[sl].to(w_t.device)
        z = h @ w_t.T.to(h.dtype)
        if not teacher_head.is_plain:
            z = teacher_head.apply(z.to(torch.promote_types(z.dtype, torch.float32)), True)
        return z.to(device)

    return teacher_chunk


def selective_head_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    mask: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_token_logprobs: Tensor | None = None,
    kind: str = "reverse_kl",
    tokens: Tensor | None = None,
    normalizer: float | None = None,
    reduction: str = "token",
    beta: float = 0.5,
    temperature: float = 1.0,
    old_logprobs: Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    student_head: HeadSpec = PLAIN_HEAD,
    teacher_head: HeadSpec = PLAIN_HEAD,
    token_weights: Tensor | None = None,
) -> Tensor:
    """The `opd_loss` (`token_weights`: see `row_weights`) of the kept positions from student
    hidden states [..., d] and lm_head [V, d]. `student_head` / `teacher_head` (`HeadSpec`) add
    each head's bias (the student's gets its gradient), logit scale and softcapping.

    Only rows where `mask` is True are projected through the vocabulary (with gradient, in chunks
    of `chunk_size`). The teacher comes as hidden states + lm_head (projected at kept rows only, no
    grad) or as logits, full [..., V] or already the kept rows [n, V]. Equal to the dense path.
    For kind 'pg' the teacher may instead come as `teacher_token_logprobs`, log p_T(y) of the
    sampled tokens [...] (a teacher served over HTTP), taken as given (no temperature applied).
    """
    _check_teacher_inputs(
        teacher_logits, teacher_hidden, teacher_weight, teacher_token_logprobs, kind, chunk_size
    )
    w_s = trim_vocab(student_weight, vocab_size, dim=0)
    student_head = student_head.trimmed(vocab_size)
    teacher_head = teacher_head.trimmed(vocab_size)
    student_head.check(w_s.shape[0], "student")
    b_s = student_head.bias
    rows, weights = row_weights(mask, reduction, normalizer, token_weights)
    h_rows = student_hidden.reshape(-1, student_hidden.shape[-1])[rows]
    if rows.numel() == 0:
        return _no_rows_loss(student_hidden, w_s, b_s)
    tok_rows = _rows(tokens, mask, rows)
    old_rows = _rows(old_logprobs, mask, rows)
    if teacher_token_logprobs is not None:
        if tok_rows is None:
            raise ValueError("kind='pg' needs the sampled token ids (tokens=...)")
        lt_rows = _rows(teacher_token_logprobs.detach(), mask, rows)
        token_loss = _served_pg_loss(lt_rows, tok_rows, old_rows, weights, temperature)
        return _FusedHeadLoss.apply(h_rows, w_s, b_s, student_head, token_loss, chunk_size, None)
    teacher_chunk = _teacher_chunks(
        teacher_logits, teacher_hidden, teacher_weight, teacher_head, mask, rows, vocab_size,
        w_s.shape[0], h_rows.device,
    )  # fmt: skip
    chunk_loss, fast = _chunk_losses(
        teacher_chunk, kind, tok_rows, old_rows, weights, beta, temperature
    )
    return _FusedHeadLoss.apply(h_rows, w_s, b_s, student_head, chunk_loss, chunk_size, fast)


def _no_rows_loss(student_hidden: Tensor, w_s: Tensor, b_s: Tensor | None) -> Tensor:
    """A zero loss with a (zero) gradient path to every input, for a mask that keeps nothing."""
    zero = student_hidden.reshape(-1)[:1].sum() * 0.0 + w_s.reshape(-1)[:1].sum() * 0.0
    return zero + b_s[:1].sum() * 0.0 if b_s is not None else zero


ChunkLoss = Callable[[Tensor, slice], Tensor]
"""A chunk's weighted loss from its student logits and its slice of the kept rows."""


def _served_pg_loss(
    lt_rows: Tensor,
    tok_rows: Tensor,
    old_rows: Tensor | None,
    weights: Tensor,
    temperature: float,
) -> ChunkLoss:
    """The 'pg' chunk loss against a served teacher's log p_T(y) of the sampled tokens."""

    def token_chunk_loss(student_chunk_logits: Tensor, sl: slice) -> Tensor:
        dtype = torch.promote_types(student_chunk_logits.dtype, torch.float32)
        ls = torch.log_softmax(student_chunk_logits.to(dtype) / temperature, dim=-1)
        old = old_rows[sl] if old_rows is not None else None
        per = _pg_loss(ls, lt_rows[sl], tok_rows[sl], old, CLIP_LOW, CLIP_HIGH)
        return (per * weights[sl].to(per.dtype)).sum()

    return token_chunk_loss


def _chunk_losses(
    teacher_chunk: Callable[[slice], Tensor],
    kind: str,
    tok_rows: Tensor | None,
    old_rows: Tensor | None,
    weights: Tensor,
    beta: float,
    temperature: float,
) -> tuple[ChunkLoss, Callable[[Tensor, slice], tuple[Tensor, Tensor]] | None]:
    """A chunk's loss against the teacher's logits of its rows (`teacher_chunk(sl)`), and for
    reverse KL its value and logit gradient in one pass (the fused backward's fast path)."""

    def chunk_loss(student_chunk_logits: Tensor, sl: slice) -> Tensor:
        per = per_token_loss(
            student_chunk_logits,
            teacher_chunk(sl),
            kind,
            tokens=tok_rows[sl] if tok_rows is not None else None,
            beta=beta,
            temperature=temperature,
            old_logprobs=old_rows[sl] if old_rows is not None else None,
        )
        return (per * weights[sl].to(per.dtype)).sum()

    value_and_grad = None
    if kind == "reverse_kl":

        def value_and_grad(student_chunk_logits: Tensor, sl: slice) -> tuple[Tensor, Tensor]:
            return _reverse_kl_value_and_grad(
                student_chunk_logits, teacher_chunk(sl), weights[sl], temperature
            )

    return chunk_loss, value_and_grad

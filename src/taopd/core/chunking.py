"""Chunked scoring: the reusable buffers (`Workspace`), the vocabulary projection of a chunk of
hidden states, and the loops that score `chunk_size` positions at a time, so at most
[chunk_size, 2, V] logits exist.

Imports torch only; `scores.signals_from_hidden` and `signals_from_teacher_topk` call the loops.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .row_signals import _stacked_signals, _topk_rows

__all__ = ["Workspace", "stacked_chunks", "topk_chunks"]


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


def stacked_chunks(
    h_s: Tensor,
    h_t: Tensor,
    w_s: Tensor,
    w_t: Tensor,
    heads: tuple[Any, Any],
    tok: Tensor | None,
    k: int,
    temperature: float,
    chunk_size: int,
    projection_dtype: torch.dtype | None,
    workspace: Workspace | None,
    dtype: torch.dtype,
) -> list[dict]:
    """The signal rows of hidden states h_s / h_t [N, d] (valid positions) through heads
    w_s / w_t [V, d] and their `HeadSpec`s, `chunk_size` rows at a time."""
    student_head, teacher_head = heads
    device = h_s.device
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
    return rows


def topk_chunks(
    h_s: Tensor,
    w_s: Tensor,
    teacher: tuple[Tensor, Tensor, Tensor],
    tok: Tensor,
    k: int,
    chunk_size: int,
    projection_dtype: torch.dtype | None,
    workspace: Workspace | None,
    dtype: torch.dtype,
) -> list[dict]:
    """The signal rows of student hidden states h_s [N, d] through w_s [V, d] against a top-k
    teacher (`teacher`: its ids and log-probs [N, R], log p_T of `tok` [N]), by chunks."""
    t_ids, t_lp, t_tok = teacher
    device, vocab = h_s.device, w_s.shape[0]
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
    return rows

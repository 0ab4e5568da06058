"""Token-view records: per response token, its signals, whether it was selected, and the
student's and teacher's top candidates (samples.jsonl, read by report.py's token view).

Written by the training step, the diagnostic's bank samples, and read back by the report.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.scores import TokenSignals, teachability_of
from ..core.signal_names import SAMPLE_SIGNALS
from .rollout import Rollout

__all__ = ["token_samples"]


def _candidates(tokenizer: Any, ids: Tensor, probs: Tensor) -> list[list[list[Any]]]:
    """Per position, [[decoded token, probability], ...] of the given top ids."""
    return [
        [[tokenizer.decode([int(t)]), round(float(q), 4)] for t, q in zip(tr, prr)]
        for tr, prr in zip(ids, probs)
    ]


def _top_candidates(
    tokenizer: Any,
    b: int,
    idx: Tensor,
    sides: list[tuple[str, Tensor, Tensor]],
    vocab_size: int,
    top: int,
    teacher_top: tuple[Tensor, Tensor] | None,
) -> dict[str, list[list[list[Any]]]]:
    """Row `b`'s top candidates at positions `idx`: each side's (name, hidden states, lm_head)
    projected there, and a served teacher's returned ids (`teacher_top`)."""
    cands = {}
    for side, h, w in sides:
        logits = h[b, idx].float() @ w[:vocab_size].float().T
        pr, ti = torch.softmax(logits, -1).topk(top, -1)
        cands[side] = _candidates(tokenizer, ti, pr)
    if teacher_top is not None:
        lp, order = teacher_top[1][b, idx].float().topk(top, -1)
        cands["teacher_top"] = _candidates(
            tokenizer, teacher_top[0][b, idx].gather(-1, order), lp.exp()
        )
    return cands


def _position_signals(
    sig: TokenSignals, teach: Tensor, b: int, idx: Tensor
) -> dict[str, list[float]]:
    """Row `b`'s signals at positions `idx`, teachability first; NaN-only ones left out."""
    signals = {"teachability": teach[b, idx].tolist()}
    for name in SAMPLE_SIGNALS:
        values = getattr(sig, name)[b, idx]
        if not bool(torch.isnan(values).all()):  # NaN: not available (served teacher)
            signals[name] = values.tolist()
    return signals


@torch.no_grad()
def token_samples(
    tokenizer: Any,
    roll: Rollout,
    sig: TokenSignals,
    mask: Tensor,
    h_s: Tensor,
    h_t: Tensor | None,
    w_s: Tensor,
    w_t: Tensor | None,
    vocab_size: int,
    step: int,
    rows: int = 2,
    top: int = 5,
    teach: Tensor | None = None,
    teacher_top: tuple[Tensor, Tensor] | None = None,
    tags: Tensor | None = None,
) -> list[dict[str, Any]]:
    """Token-view records (report.py's samples.jsonl format) for the first `rows` rollouts.

    Per response token: the signals, whether it was selected, and the student's and teacher's
    top candidates (only these few rows are projected through the lm_heads). `teach` gives the
    teachability normalized over a larger batch; by default it is normalized over `roll`.
    `teacher_top` (ids, log-probs [B, T, R]) replaces h_t / w_t for a teacher served over HTTP.
    `tags` (bool [B, T]) marks planted-style positions: each token gets a `kinds` entry.
    """
    p = roll.prompt_len
    valid = roll.response_mask[:, p:]
    if teach is None:
        teach = teachability_of(sig, valid)
    out = []
    for b in range(min(rows, valid.shape[0])):
        idx = valid[b].nonzero().squeeze(-1)
        ids = roll.input_ids[b, p:][idx].tolist()
        sides = [("student_top", h_s, w_s)] + (
            [("teacher_top", h_t, w_t)] if h_t is not None else []
        )
        cands = _top_candidates(tokenizer, b, idx, sides, vocab_size, top, teacher_top)
        signals = _position_signals(sig, teach, b, idx)
        prompt_ids = roll.input_ids[b, :p][roll.attention_mask[b, :p].bool()]
        out.append(
            {
                "step": step,
                "prompt": tokenizer.decode(prompt_ids.tolist()),
                "answer": None,
                "correct": None,
                "tokens": [tokenizer.decode([t]) for t in ids],
                "selected": mask[b, idx].tolist(),
                **(
                    {}
                    if tags is None
                    else {"kinds": ["style" if t else "other" for t in tags[b, idx].tolist()]}
                ),
                "signals": signals,
                **cands,
            }
        )
    return out

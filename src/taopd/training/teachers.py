"""How the teacher answers a step: a model in this process, or a server's top-k log-probs.

A `Teacher` is chosen once at setup. For each rollout it gives a `TeacherView`: what scoring
needs (hidden states and lm_head, or top-k ids and log-probs), what the selective loss needs
for a micro-batch, and what the token view shows. `score_rollout` turns a view and the
student's hidden states into per-position signals; the step, the held-out KL and the
diagnostic all score through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ..core.scores import TokenSignals, Workspace, signals_from_hidden, signals_from_teacher_topk
from ..models import lm_head
from .rollout import Rollout, response_hidden

if TYPE_CHECKING:
    from .teacher_server import TeacherServer

__all__ = [
    "LocalTeacher",
    "LocalView",
    "ServedTeacher",
    "ServedView",
    "Teacher",
    "TeacherView",
    "score_rollout",
]


class Evaluator(Protocol):
    """What a teacher's accuracy needs of `evaluate.Evaluator` (named here, not imported, so
    `evaluate` can build on this module without an import circle)."""

    def accuracy(self, model: Any) -> float: ...

    def served_accuracy(self, server: TeacherServer) -> float: ...


class TeacherView:
    """The teacher's answer for one rollout."""

    def signals(
        self, h_s: Tensor, w_s: Tensor, tokens: Tensor, valid: Tensor, **common: Any
    ) -> TokenSignals:
        """Per-position signals against the student's hidden states `h_s` and lm_head `w_s`."""
        raise NotImplementedError

    def loss_inputs(self, rows: slice | Tensor, cols: int | None = None) -> dict[str, Any]:
        """The teacher's keyword arguments of `selective_head_loss` for `rows` of the rollout
        (a slice or row indices), its first `cols` response columns when given."""
        raise NotImplementedError

    def sample_inputs(self) -> dict[str, Any]:
        """The teacher's keyword arguments of `token_samples` (its top candidates)."""
        raise NotImplementedError


class LocalView(TeacherView):
    """Hidden states [B, T, d_T] of the response positions and the lm_head weight."""

    def __init__(self, hidden: Tensor, weight: Tensor) -> None:
        self.hidden, self.weight = hidden, weight

    def signals(
        self,
        h_s: Tensor,
        w_s: Tensor,
        tokens: Tensor,
        valid: Tensor,
        temperature: float = 1.0,
        **common: Any,
    ) -> TokenSignals:
        return signals_from_hidden(
            h_s, w_s, self.hidden, self.weight, tokens=tokens, valid=valid,
            temperature=temperature, **common,
        )  # fmt: skip

    def loss_inputs(self, rows: slice | Tensor, cols: int | None = None) -> dict[str, Any]:
        return {"teacher_hidden": self.hidden[rows][:, :cols], "teacher_weight": self.weight}

    def sample_inputs(self) -> dict[str, Any]:
        return {"h_t": self.hidden, "w_t": self.weight}


class ServedView(TeacherView):
    """A served teacher's top ids and log-probs [B, T, R] and log p_T(y_t) [B, T]."""

    def __init__(self, ids: Tensor, logprobs: Tensor, token_logprobs: Tensor) -> None:
        self.ids, self.logprobs, self.token_logprobs = ids, logprobs, token_logprobs

    def signals(
        self,
        h_s: Tensor,
        w_s: Tensor,
        tokens: Tensor,
        valid: Tensor,
        temperature: float = 1.0,
        **common: Any,
    ) -> TokenSignals:
        # loss.temperature is 1 with a served teacher (config check)
        return signals_from_teacher_topk(
            h_s, w_s, self.ids, self.logprobs, self.token_logprobs, tokens, valid=valid, **common
        )

    def loss_inputs(self, rows: slice | Tensor, cols: int | None = None) -> dict[str, Any]:
        return {"teacher_token_logprobs": self.token_logprobs[rows][:, :cols]}

    def sample_inputs(self) -> dict[str, Any]:
        return {"h_t": None, "w_t": None, "teacher_top": (self.ids, self.logprobs)}


def score_rollout(
    roll: Rollout,
    h_s: Tensor,
    w_s: Tensor,
    teacher: TeacherView,
    *,
    k: int,
    vocab_size: int,
    chunk_size: int,
    temperature: float = 1.0,
    projection_dtype: torch.dtype | None = None,
    workspace: Workspace | None = None,
) -> TokenSignals:
    """Per-position signals [B, T] of a rollout's response positions (Eq. 9-12, 17).

    `workspace`: the scoring buffers to reuse (a trainer keeps one across steps)."""
    p = roll.prompt_len
    return teacher.signals(
        h_s,
        w_s,
        roll.input_ids[:, p:],
        roll.response_mask[:, p:],
        temperature=temperature,
        k=k,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        projection_dtype=projection_dtype,
        workspace=workspace,
    )


class Teacher:
    """A teacher kind: what it answers for a rollout, and its own greedy accuracy."""

    label: str  # what summary.json names as the teacher
    model: nn.Module | None = None  # the weights, when they are in this process
    full_distribution = True  # gives p_T over the whole vocabulary (held-out KL, KL metrics)

    def view(self, roll: Rollout, chunks: list[slice]) -> TeacherView:
        """The teacher's answer for `roll` (its rows scored `chunks` at a time)."""
        raise NotImplementedError

    def accuracy(self, evaluator: Evaluator) -> float:
        """Greedy accuracy on the test split, reduced over processes."""
        raise NotImplementedError


class LocalTeacher(Teacher):
    """Teacher weights in this process, frozen: hidden states per rollout, no gradient."""

    def __init__(self, model: nn.Module, label: str) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.label = label

    @torch.no_grad()
    def view(self, roll: Rollout, chunks: list[slice]) -> LocalView:
        hidden = torch.cat([response_hidden(self.model, roll, c) for c in chunks])
        return LocalView(hidden, lm_head(self.model))

    def accuracy(self, evaluator: Evaluator) -> float:
        return evaluator.accuracy(self.model)


class ServedTeacher(Teacher):
    """A teacher behind a vLLM server (teacher_server.py): top-k log-probs of each rollout."""

    full_distribution = False

    def __init__(self, server: TeacherServer, vocab_size: int) -> None:
        self.server = server
        self.vocab_size = vocab_size
        self.label = repr(server)

    def view(self, roll: Rollout, chunks: list[slice]) -> ServedView:
        r = roll
        ids, lps, tok_lp = self.server.score(
            r.input_ids, r.attention_mask, r.response_mask, r.prompt_len, self.vocab_size
        )
        return ServedView(ids, lps, tok_lp)

    def accuracy(self, evaluator: Evaluator) -> float:
        return evaluator.served_accuracy(self.server)

"""The pieces of a training step that need no Trainer: its phases and their clock, the
micro-batches, the student's forward passes (for scoring, and the gradient passes over the kept
region), and selection over the global batch.

train.py's `Trainer.train_step` strings them together; each takes the process group it reduces
over, so a step runs the same collectives on every rank.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import seeds
from ..core.scores import TokenSignals
from ..core.selection import select_tokens
from ..core.weights import token_weights
from ..errors import UserError
from .collectives import Group
from .engines import StudentEngine
from .rollout import Rollout, response_hidden

if TYPE_CHECKING:
    from ..config import Config
    from .teachers import TeacherView

__all__ = [
    "PHASES", "PhaseClock", "RunStopped", "StepPass", "TrainingError", "grad_hidden", "kept_pass",
    "kept_region", "kept_share", "micro_batches", "pass_input", "select_batch", "student_hidden",
]  # fmt: skip


class TrainingError(UserError):
    """A run that cannot go on (e.g. repeated non-finite losses); its last checkpoint is kept."""


class RunStopped(TrainingError):
    """A run stopped as asked (SIGINT/SIGTERM) after finishing a step and saving it: not an
    error (the CLI prints one calm line, and how to resume)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, out: Path) -> None:
        self.signal_name, self.step, self.checkpoint, self.out = signal_name, step, checkpoint, out
        saved = f"checkpoint saved at {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"stopped by {signal_name} at step {step}; {saved}")


PHASES = (
    "rollout", "teacher", "student_forward", "scoring", "selection", "loss", "backward",
    "optimizer",
)  # fmt: skip
"""The phases of a step whose seconds `train_step` logs as `<phase>_seconds` (metrics.jsonl)."""


class PhaseClock:
    """Wall seconds per phase of a step, read at phase boundaries (`lap`).

    CUDA kernels run asynchronously: each reading first waits for the device, so a phase is
    charged the GPU work it queued rather than the next phase's first synchronizing call.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.start = self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to `phase` (added up over micro-batches)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now


class StepPass(NamedTuple):
    """What a step's forward and backward passes leave for its metrics and samples."""

    roll: Rollout
    sig: TokenSignals
    mask: Tensor
    h_s: Tensor
    teacher: TeacherView
    loss: float
    clock: PhaseClock
    weights: Tensor | None = None  # selection.mode=weight: this rank's token weights


def kept_region(mask: Tensor, rows: slice) -> tuple[Tensor, int] | None:
    """The rows of micro-batch `rows` with a kept position (rollout row indices) and the number
    of response columns up to the last kept one: all a gradient pass needs, since a causal
    body's hidden states at a kept position do not depend on what follows. None if none kept."""
    m = mask[rows]
    hit = m.any(-1)
    if not bool(hit.any()):
        return None
    cols = int(m.any(0).nonzero().max()) + 1
    return hit.nonzero().squeeze(-1) + (rows.start or 0), cols


def kept_pass(mode: str, last_share: float | None) -> bool:
    """Whether a step's gradient pass covers only the kept region (train.grad_pass `mode`;
    "auto": when the previous step's kept region, `last_share`, was under half the batch)."""
    if mode == "auto":  # the previous step's kept region predicts this one's
        return last_share is not None and last_share < 0.5
    return mode == "kept"


def grad_hidden(
    engine: StudentEngine, roll: Rollout, rows: slice | Tensor, cols: int | None = None
) -> Tensor:
    """The student's response hidden states of `rows` (first `cols` response columns), with
    gradient (through the engine)."""
    return engine.forward(lambda m: response_hidden(m, roll, rows, cols))


def student_hidden(
    engine: StudentEngine,
    student: nn.Module,
    roll: Rollout,
    chunks: list[slice],
    n_passes: int,
    kept_pass: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Detached student hidden states for scoring, and the grad pass when there is one.

    With one micro-batch the same body forward serves scoring (detached) and the loss, unless
    `kept_pass`; otherwise scoring runs without gradient and each loss pass runs its own
    forward over the kept region of its micro-batch.
    """
    student.train()
    if n_passes == 1 and not kept_pass:
        h_grad = grad_hidden(engine, roll, chunks[0])
        return h_grad.detach(), h_grad
    with torch.no_grad():
        return torch.cat([response_hidden(student, roll, c) for c in chunks]), None


def pass_input(
    engine: StudentEngine,
    roll: Rollout,
    mask: Tensor,
    chunks: list[slice],
    i: int,
    h_grad: Tensor | None,
) -> tuple[Any, int | None, Tensor, bool]:
    """Rows, columns and hidden states of gradient pass `i`, and whether it is live.

    With the shared forward (`h_grad`) a pass is a micro-batch; otherwise it runs its own
    forward over the micro-batch's kept region (rows with a kept position, up to the last
    kept column). Passes past this rank's micro-batches, or with nothing kept, are padding
    passes (not live) that only keep the collectives aligned across ranks."""
    c = chunks[min(i, len(chunks) - 1)]
    live = i < len(chunks)
    if h_grad is not None:
        return c, None, h_grad, live
    region = kept_region(mask, c) if live else None
    rows, cols = region or (torch.tensor([c.start or 0]), 1)  # a padding pass: one token
    return rows, cols, grad_hidden(engine, roll, rows, cols), region is not None


def micro_batches(n_rows: int, size: int | None, group: Group) -> tuple[list[slice], int]:
    """This rank's micro-batches of at most `size` rows (train.micro_batch_size; None: one) and
    the number of passes every rank runs (the most)."""
    mb = size or n_rows
    chunks = [slice(i, min(i + mb, n_rows)) for i in range(0, n_rows, mb)]
    return chunks, group.all_reduce_max(len(chunks))


def kept_share(mask: Tensor, roll: Rollout, group: Group) -> float:
    """Share of the batch's body tokens (all ranks) that a kept-region pass would run: the
    rows with a kept position, each up to its last kept column."""
    p, width = roll.prompt_len, mask.shape[-1]
    cols = torch.arange(1, width + 1, device=mask.device)
    last = (mask * cols).amax(-1)  # 1 + the last kept column, 0 without one
    region = float(((p + last) * (last > 0)).sum())
    return group.all_reduce_sum(region) / group.all_reduce_sum(float(mask.shape[0] * (p + width)))


def select_batch(
    sig: TokenSignals, valid: Tensor, step: int, cfg: Config, group: Group
) -> tuple[Tensor, float, Tensor | None]:
    """Selection over the global batch: this rank's mask, the loss normalizer (the global
    count of kept tokens, or of sequences with one, per loss.reduction; of valid ones with
    loss.normalize=valid) and, in selection.mode=weight, this rank's token weights (else None;
    weights and their mean-1 scale are global too)."""
    sel = cfg.selection
    names = [name for name, _ in sig.items()]
    shapes = group.row_shapes(valid)
    g_valid = group.gather_rows(valid, False, shapes)
    g_sig = TokenSignals(
        **{n: group.gather_rows(getattr(sig, n), 0.0, shapes).cpu() for n in names}
    )
    gen = torch.Generator(device="cpu").manual_seed(seeds.selection(cfg.train.seed, step))
    weights = None
    if sel.mode == "weight":
        mask = g_valid.to(valid.device)
        kw = {"floor": sel.weight_floor, "gamma": sel.iw_gamma}
        weights = token_weights(g_sig, g_valid.cpu(), sel.strategy, **kw).to(valid.device)
    else:
        mask = select_tokens(
            g_sig, g_valid.cpu(), strategy=sel.strategy, ratio=sel.ratio, scope=sel.scope,
            min_per_sequence=sel.min_per_sequence, generator=gen,
        ).to(valid.device)  # fmt: skip
    if not mask.any():
        raise TrainingError("selection kept no positions in the whole batch")
    # loss.normalize "kept": mean over kept (Eq. 7); "valid": kept sum over all valid
    counted = mask if cfg.loss.normalize == "kept" else g_valid.to(mask.device)
    if cfg.loss.reduction == "token":
        normalizer = float(counted.sum())
    else:
        normalizer = float((counted.sum(-1) > 0).sum())
    first = group.first_row(shapes)
    mine = (slice(first, first + valid.shape[0]), slice(0, valid.shape[1]))
    return mask[mine], normalizer, None if weights is None else weights[mine]

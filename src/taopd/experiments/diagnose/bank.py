"""The diagnostic's bank: held-out student rollouts frozen in bank.pt, and their signals.

θ0 and θτ are scored on the same prefixes: the bank is sampled once (temperature 1) from the
initial student, saved, and scored with `score_rollout` (the step's scoring) batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ... import seeds
from ...config import Config
from ...core.scores import TokenSignals
from ...core.selection import select, strategy_scores
from ...data import Example
from ...errors import UserError
from ...models import lm_head
from ...training.checkpoint import load_rollout, save_rollout
from ...training.rollout import Rollout, response_hidden
from ...training.samples import token_samples
from ...training.teachers import LocalView, score_rollout

__all__ = [
    "BANK_FILE",
    "Models",
    "bank_meta",
    "bank_samples",
    "load_bank",
    "make_bank",
    "save_bank",
    "score_bank",
]

BANK_FILE = "bank.pt"
N_TOKEN_VIEW = 8  # bank contexts shown in the report's token view


@dataclass
class Models:
    """What the diagnostic scores with: the student (θ0, updated in place to θτ), the frozen
    teacher, the student's tokenizer and the vocabulary both share."""

    student: nn.Module
    teacher: nn.Module
    tokenizer: Any
    vocab_size: int

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device


def save_bank(path: Path, roll: Rollout, prompts: list[str], meta: dict[str, Any]) -> None:
    """Write the frozen bank: the Rollout tensors, texts, prompts and `meta` (a plain dict)."""
    save_rollout(path, roll, prompts=list(prompts), meta=meta)


def load_bank(path: str | Path) -> tuple[Rollout, list[str], dict[str, Any]]:
    """(rollout, prompts, meta) of a bank written by `save_bank` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"bank {path} does not exist (a bank.pt written by `taopd diagnose`)")
    roll, data = load_rollout(path, "bank")
    return roll, list(data.get("prompts", [])), dict(data.get("meta", {}))


def make_bank(
    sampler: Any,
    student: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> Rollout:
    """One temperature-1 rollout of the (θ0) student per prompt, `batch_size` at a time."""
    parts = []
    chunks = range(0, len(prompts), batch_size)
    for i in tqdm(chunks, desc="bank: sampling", disable=not progress):
        parts.append(
            sampler(
                student,
                tokenizer,
                prompts[i : i + batch_size],
                max_new_tokens=max_new_tokens,
                temperature=1.0,
                top_p=1.0,
                seed=seeds.bank_batch(seed, i),
            ).to("cpu")
        )
    return Rollout.concat(parts, tokenizer.pad_token_id)


def bank_meta(
    cfg: Config, examples: list[Example], max_new_tokens: int, seed: int
) -> dict[str, Any]:
    """What bank.pt records of how it was made."""
    return {
        "student": cfg.student,
        "task": cfg.task.name or cfg.task.path,
        "split": "test",
        "n_contexts": len(examples),
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0,
        "seed": seed,
        "questions": [ex.question for ex in examples],
        "answers": [ex.answer for ex in examples],
    }


@torch.no_grad()
def score_bank(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    bank: Rollout,
    vocab_size: int,
    k: int = 16,
    batch_size: int = 32,
    chunk_size: int = 512,
    teacher_cache: list[Tensor] | None = None,
    desc: str = "bank: scoring",
    progress: bool = True,
) -> TokenSignals:
    """All signals of `student` vs `teacher` on the bank's response positions, each [B, R].

    `teacher_cache` (a list, filled on the first call) keeps the teacher's response hidden
    states per batch so later calls skip the teacher forward. Temperature 1.
    """
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    w_s, w_t = lm_head(student), lm_head(teacher)
    out: list[TokenSignals] = []
    starts = list(range(0, len(bank), batch_size))
    for j, i in enumerate(tqdm(starts, desc=desc, disable=not progress, leave=False)):
        sub = bank.rows(slice(i, i + batch_size)).to(device)
        h_s = response_hidden(student, sub)
        if teacher_cache is not None and j < len(teacher_cache):
            h_t = teacher_cache[j].to(device)
        else:
            h_t = response_hidden(teacher, sub)
            if teacher_cache is not None:
                teacher_cache.append(h_t)
        view = LocalView(h_t, w_t)
        kw = dict(k=k, vocab_size=vocab_size, chunk_size=chunk_size)
        out.append(score_rollout(sub, h_s, w_s, view, **kw))
    student.train(was_training)
    names = [n for n, _ in out[0].items()]
    return TokenSignals(**{n: torch.cat([getattr(s, n) for s in out]).cpu() for n in names})


@torch.no_grad()
def bank_samples(models: Models, bank: Rollout, sig0: TokenSignals) -> list[dict[str, Any]]:
    """Token-view records of the first bank contexts at θ0; marked: teachability's top 5%."""
    p = bank.prompt_len
    valid = bank.response_mask[:, p:]
    teach = strategy_scores("teachability", sig0, valid)
    keep = select(teach, valid, 0.05)
    n = min(N_TOKEN_VIEW, len(bank))
    sub = bank.rows(slice(0, n)).to(models.device)
    h_s = response_hidden(models.student, sub)
    h_t = response_hidden(models.teacher, sub)
    part = TokenSignals(**{name: t[:n] for name, t in sig0.items()})
    return token_samples(
        models.tokenizer,
        sub,
        part,
        keep[:n],
        h_s,
        h_t,
        lm_head(models.student),
        lm_head(models.teacher),
        models.vocab_size,
        step=0,
        rows=n,
        teach=teach[:n].clamp_min(0.0),
    )

"""Supervised fine-tuning on a task's train split (the embedded settings' cached preparation).

The CPU demo needs a teacher that clearly beats the student on the task; with only the 135M model
available offline, the teacher is a copy fine-tuned on reference answers (or worked solutions),
cached by content hash. The chain-of-thought setting also warm-starts the student with a short
fine-tune on the same format (`student_sft`), so teacher and student share it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import Config, TeacherSFT
from ..data import Example, make_task, render_prompt, styled_solution
from ..errors import UserError
from ..models import cache_dir, hidden_states, lm_head, load_model, load_tokenizer

__all__ = [
    "answer_loss",
    "prepare_student",
    "prepare_teacher",
    "sft_batch",
    "sft_cache_key",
    "teacher_cache_key",
]

ROLES = ("teacher", "student")


def _role(cfg: Config, role: str) -> tuple[str, TeacherSFT]:
    """The base model and the fine-tune settings of `role`."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    sft = cfg.teacher_sft if role == "teacher" else cfg.student_sft
    if sft is None:
        raise ValueError(f"the config has no {role}_sft section")
    return (cfg.teacher if role == "teacher" else cfg.student), sft


def sft_cache_key(cfg: Config, role: str = "teacher") -> str:
    """Content hash of everything that determines the fine-tuned `role` model."""
    base, sft = _role(cfg, role)
    fields: dict[str, Any] = {
        # the teacher's key predates student warm starts: unchanged, so caches stay valid
        "teacher": base,
        "task": cfg.task.as_task_dict(),
        "suffix": cfg.task.prompt_suffix,
        "system_prompt": cfg.task.system_prompt,
        "chat_template": cfg.task.chat_template,
        "n_train": cfg.task.n_train,
        "seed": cfg.task.seed,
        "sft": sft.cache_fields(),
        "version": 1,
    }
    if role != "teacher":
        fields["role"] = role
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def teacher_cache_key(cfg: Config) -> str:
    """Content hash of everything that determines the fine-tuned teacher."""
    return sft_cache_key(cfg, "teacher")


def sft_batch(tokenizer: Any, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer+eos ids; labels on the answer and eos only (-100 elsewhere)."""
    eos = tokenizer.eos_token or ""
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer + eos, add_special_tokens=False)["input_ids"]
        rows.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def answer_loss(model: torch.nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the labeled tokens, projecting only their positions through the
    lm_head (the 49k-row head over every prompt position is most of a small model's cost)."""
    hidden = hidden_states(model, enc["input_ids"], enc["attention_mask"])[:, :-1]
    labels = enc["labels"][:, 1:]
    keep = labels != -100
    logits = hidden[keep] @ lm_head(model).T
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def _target(ex: Example, sft: TeacherSFT) -> str:
    """The fine-tuning text: the worked solution in `sft.style` when one is set."""
    if sft.style is None:
        return ex.target
    if ex.solution is None:
        raise UserError("teacher_sft.style needs worked solutions: set task.solution: worked")
    st = sft.style
    return styled_solution(ex.solution, st.marker, st.where, st.every)


def prepare_teacher(cfg: Config, progress: bool = True) -> Path:
    """Fine-tune `cfg.teacher` on the task's targets once (`teacher_sft`); the cached folder."""
    return prepare_sft(cfg, "teacher", progress)


def prepare_student(cfg: Config, progress: bool = True) -> Path:
    """Warm-start `cfg.student` on the task's targets once (`student_sft`); the cached folder."""
    return prepare_sft(cfg, "student", progress)


def prepare_sft(cfg: Config, role: str, progress: bool = True) -> Path:
    """Fine-tune the `role` model on the task's targets (worked solution or answer) once;
    return the cached model folder."""
    base, sft = _role(cfg, role)
    if sft.style is not None and cfg.task.solution != "worked":
        raise UserError(
            f"{role}_sft.style rewrites worked solutions: set task.solution: worked "
            f"(got {cfg.task.solution!r})"
        )
    out = cache_dir() / f"{role}s" / sft_cache_key(cfg, role)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(sft.seed)
    tokenizer = load_tokenizer(base)
    # the trainer's rule (accelerate's default device): a GPU when there is one
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(base, dtype=cfg.train.dtype, device=device)
    model.train()
    task = make_task({**cfg.task.as_task_dict(), "suffix": cfg.task.prompt_suffix or None})
    examples = task.examples("train", cfg.task.n_train, seed=cfg.task.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=sft.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(sft.seed)
    order = torch.randperm(len(examples), generator=gen).tolist()
    start = time.perf_counter()
    bar = tqdm(range(sft.steps), desc=f"{role} fine-tune", disable=not progress)
    for step in bar:
        idx = [order[(step * sft.batch_size + j) % len(order)] for j in range(sft.batch_size)]
        batch = [examples[i] for i in idx]
        prompts = [
            render_prompt(tokenizer, ex.question, cfg.task.system_prompt, cfg.task.chat_template)
            for ex in batch
        ]
        enc = sft_batch(tokenizer, prompts, [_target(ex, sft) for ex in batch])
        enc = {k: v.to(device) for k, v in enc.items()}
        loss = answer_loss(model, enc)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {
        "seconds": time.perf_counter() - start,
        "role": role,
        "device": device,
        "config": sft.model_dump(),
    }
    (tmp / f"taopd_{role}.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

"""Accuracy of a model on task examples (greedy by default), and a run's evaluations: accuracy
reduced over processes and the held-out KL on a fixed bank of student rollouts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from taopd import seeds
from taopd.data import Example, Task, render_prompt
from taopd.models import lm_head
from taopd.training.checkpoint import load_rollout, save_rollout
from taopd.training.rollout import Rollout, generate, response_hidden, tokenize_left
from taopd.training.teachers import Teacher, score_rollout

if TYPE_CHECKING:
    from taopd.config import Config
    from taopd.training.collectives import Group
    from taopd.training.teacher_server import TeacherServer

__all__ = ["Evaluator", "evaluate", "is_correct"]

N_SAMPLES = 20


def is_correct(score: float) -> bool:
    """A task score counts as a correct answer at 1 (verifiers may return partial credit)."""
    return score >= 1.0 - 1e-9


def _score_batch(
    task: Task,
    batch: list[Example],
    texts: list[str],
    scores: list[float],
    samples: list[dict[str, Any]],
) -> None:
    """Score a batch's completions into `scores`; the first N_SAMPLES records into `samples`."""
    for ex, text in zip(batch, texts, strict=True):
        score = task.score(text, ex)
        scores.append(score)
        if len(samples) < N_SAMPLES:
            samples.append(
                {
                    "question": ex.question,
                    "completion": text,
                    "answer": ex.answer,
                    "correct": is_correct(score),
                }
            )


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: list[Example],
    batch_size: int = 64,
    max_new_tokens: int = 8,
    system_prompt: str | None = None,
    progress: bool = True,
    greedy: bool = True,
    temperature: float = 1.0,
    chat_template: bool = True,
) -> dict[str, Any]:
    """Score the model's completions on `examples`: accuracy (fraction correct), n, samples.

    Returns {'accuracy', 'mean_score', 'n', 'n_correct', 'seconds', 'samples'}, where samples
    holds the first 20 question/completion/answer/correct records (for logs and reports).
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("evaluate needs at least one example")
    start = time.perf_counter()
    scores: list[float] = []
    samples: list[dict[str, Any]] = []
    bar = tqdm(total=len(examples), desc="eval", disable=not progress, leave=False)
    try:
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            prompts = [
                render_prompt(tokenizer, ex.question, system_prompt, chat_template) for ex in batch
            ]
            roll = generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                greedy=greedy,
            )
            _score_batch(task, batch, roll.texts, scores, samples)
            bar.update(len(batch))
    finally:
        bar.close()
    n_correct = sum(is_correct(s) for s in scores)
    return {
        "accuracy": n_correct / len(scores),
        "mean_score": sum(scores) / len(scores),
        "n": len(scores),
        "n_correct": n_correct,
        "seconds": time.perf_counter() - start,
        "samples": samples,
    }


class Evaluator:
    """Greedy accuracy on a run's test split and the held-out KL, each process scoring its
    share and the results reduced over `group`."""

    def __init__(
        self,
        task: Task,
        examples: list[Example],
        tokenizer: Any,
        cfg: Config,
        group: Group,
        progress: bool = True,
    ) -> None:
        self.task, self.examples, self.tokenizer, self.cfg = task, examples, tokenizer, cfg
        self.group, self.progress = group, progress
        self.bank: Rollout | None = None  # the held-out rollouts, once sampled or loaded

    def render(self, question: str) -> str:
        t = self.cfg.task
        return render_prompt(self.tokenizer, question, t.system_prompt, t.chat_template)

    def _share(self) -> list[Example]:
        return self.examples[self.group.rank :: self.group.world]

    def accuracy(self, model: Any) -> float:
        """Greedy accuracy of `model` (whole weights on every process) on the test split."""
        ex = self._share()
        n_correct, n = 0, 0
        if ex:  # more processes than test problems: this rank has none
            res = evaluate(
                model,
                self.tokenizer,
                self.task,
                ex,
                batch_size=self.cfg.eval.batch_size,
                max_new_tokens=self.cfg.eval.max_new_tokens,
                system_prompt=self.cfg.task.system_prompt,
                progress=self.progress and self.group.is_main,
                chat_template=self.cfg.task.chat_template,
            )
            n_correct, n = res["n_correct"], res["n"]
        return self.group.all_reduce_sum(n_correct) / self.group.all_reduce_sum(n)

    def served_accuracy(self, server: TeacherServer) -> float:
        """Greedy accuracy of a served teacher (temperature-0 completions)."""
        ex = self._share()
        prompts = [self.render(e.question) for e in ex]
        ids = []
        if prompts:  # the token ids the in-process evaluation feeds `generate`, unpadded
            grid, mask = tokenize_left(self.tokenizer, prompts)
            ids = [row[m.bool()].tolist() for row, m in zip(grid, mask)]
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        outs = server.generate(ids, self.cfg.eval.max_new_tokens, eos) if ids else []
        correct = 0
        for e, out in zip(ex, outs, strict=True):
            if not isinstance(out, str):
                out = self.tokenizer.decode(out, skip_special_tokens=True)
            text = out
            correct += is_correct(self.task.score(text, e))
        return self.group.all_reduce_sum(correct) / self.group.all_reduce_sum(len(ex))

    def heldout_bank(self, path: Path, sample: Callable[[list[str], int], Rollout]) -> Rollout:
        """The fixed bank of student rollouts on the first eval.heldout_kl_prompts test prompts.

        Sampled once (`sample(prompts, seed)`) from the initial student and saved in the run
        folder, so every evaluation (and every arm of a comparison with the same seed) scores
        the same contexts.
        """
        if self.bank is not None:
            return self.bank
        saved = path.exists()
        if self.group.world > 1:  # decide together, before rank 0 may write the file
            saved = self.group.all_reduce_sum(float(saved)) == self.group.world
            self.group.wait()
        if saved:
            self.bank = load_rollout(path, "held-out bank")[0]
        else:
            n = min(self.cfg.eval.heldout_kl_prompts, len(self.examples))
            prompts = [self.render(ex.question) for ex in self.examples[:n]]
            self.bank = sample(prompts, seeds.heldout_bank(self.cfg.train.seed)).to("cpu")
            if self.group.is_main:
                save_rollout(path, self.bank)
        return self.bank

    @torch.no_grad()
    def measures_heldout_kl(self, teacher: Teacher) -> bool:
        """Whether there is a held-out KL: held-out prompts and a teacher's full distribution."""
        n = min(self.cfg.eval.heldout_kl_prompts, len(self.examples))
        return n > 0 and teacher.full_distribution

    def heldout_kl(self, student: Any, teacher: Teacher, bank: Rollout, vocab_size: int) -> float:
        """Mean KL(p_S‖p_T) (Eq. 6) over the response positions of the held-out `bank`."""
        return self.heldout_kl_kinds(student, teacher, bank, vocab_size, None)["heldout_kl"]

    def heldout_kl_kinds(
        self, student: Any, teacher: Teacher, bank: Rollout, vocab_size: int, tagger: Any
    ) -> dict[str, float]:
        """`heldout_kl`, and with position tags (`tagger(ids, valid)` not None) also the mean
        over the planted-style positions (`heldout_kl_style`) and the rest (`heldout_kl_other`)."""
        roll = bank.to(self.group.device)
        sub = roll.rows(list(range(len(roll)))[self.group.rank :: self.group.world])
        g = self.group
        names = ["heldout_kl", *(f"heldout_kl_{k}" for k in getattr(tagger, "kinds", ()))]
        if not len(sub):  # more processes than bank rollouts: this rank adds nothing
            return {n: g.all_reduce_sum(0.0) / max(1.0, g.all_reduce_sum(0)) for n in names}
        h_s = response_hidden(student, sub, slice(None))
        view = teacher.view(sub, [slice(None)])
        sig = score_rollout(
            sub,
            h_s,
            lm_head(student),
            view,
            k=1,
            vocab_size=vocab_size,
            chunk_size=self.cfg.selection.chunk_size,
            temperature=self.cfg.loss.temperature,
        )
        valid = sub.response_mask[:, sub.prompt_len :]
        parts = {"heldout_kl": valid}
        if len(names) > 1:
            tags = tagger(sub.response_ids, valid)
            parts.update(heldout_kl_style=valid & tags, heldout_kl_other=valid & ~tags)
        out = {}
        for name, m in parts.items():
            total = g.all_reduce_sum(float(sig.reverse_kl[m].sum()))
            out[name] = total / max(1.0, g.all_reduce_sum(int(m.sum())))
        return out

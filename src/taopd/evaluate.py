"""Accuracy of a model on task examples, with greedy decoding by default."""

from __future__ import annotations

import time
from typing import Any

from taopd.data import Example, Task, render_prompt
from taopd.rollout import generate

__all__ = ["evaluate", "is_correct"]

N_SAMPLES = 20


def is_correct(score: float) -> bool:
    """A task score counts as a correct answer at 1 (verifiers may return partial credit)."""
    return score >= 1.0 - 1e-9


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
            for ex, text in zip(batch, roll.texts, strict=True):
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

"""evaluate.py: accuracy counts, samples, and wiring of prompts, generation and scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taopd.data import Example, FileTask, ReasoningGymTask, extract_answer, render_prompt
from taopd.models import load_model, load_tokenizer
from taopd.training.evaluate import evaluate
from taopd.training.rollout import generate


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    """(model, tokenizer) of the tiny random model."""
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def test_evaluate_reasoning_gym_counts(tiny) -> None:
    model, tok = tiny
    task = ReasoningGymTask("chain_sum", {"min_terms": 2, "max_terms": 2}, holdout=100)
    examples = task.examples("test", 25, seed=0)
    out = evaluate(model, tok, task, examples, batch_size=8, max_new_tokens=3, progress=False)
    assert out["n"] == 25
    assert 0.0 <= out["accuracy"] <= 1.0
    assert out["n_correct"] == round(out["accuracy"] * 25)
    assert len(out["samples"]) == 20
    first = out["samples"][0]
    assert set(first) == {"question", "completion", "answer", "correct"}
    assert first["question"] == examples[0].question and first["answer"] == examples[0].answer


def test_evaluate_scores_what_greedy_generates(tiny, tmp_path: Path) -> None:
    """Answers set to the greedy outputs give accuracy 1; other answers give 0."""
    model, tok = tiny
    questions = ["1 + 1 =", "2 + 3 =", "10 - 4 =", "7 + 7 =", "99 - 1 ="]
    prompts = [render_prompt(tok, q) for q in questions]
    roll = generate(model, tok, prompts, max_new_tokens=4, greedy=True)
    answers = [extract_answer(t) or "<empty>" for t in roll.texts]
    rows = [
        {"question": q, "answer": a, "split": "test"}
        for q, a in zip(questions, answers, strict=True)
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = FileTask(path)
    examples = task.examples("test", 5, seed=0)
    by_question = dict(zip(questions, roll.texts, strict=True))
    expect = sum(task.correct(by_question[e.question], e) for e in examples)
    out = evaluate(model, tok, task, examples, batch_size=2, max_new_tokens=4, progress=False)
    assert out["n_correct"] == expect
    assert out["accuracy"] == expect / 5
    if expect == 5:  # extract_answer of an answer can differ from the answer itself
        assert all(s["correct"] for s in out["samples"])

    wrong = [Example(e.question, "definitely not this", e.entry) for e in examples]
    out = evaluate(model, tok, task, wrong, batch_size=5, max_new_tokens=4, progress=False)
    assert out["accuracy"] == 0.0 and out["n"] == 5


def test_evaluate_needs_examples(tiny) -> None:
    model, tok = tiny
    with pytest.raises(ValueError):
        evaluate(model, tok, ReasoningGymTask("chain_sum", {}), [], progress=False)

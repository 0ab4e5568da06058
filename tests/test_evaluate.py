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


# ------------------------------------------------------------------------------- taopd eval


@pytest.fixture
def eval_cfg(tmp_path: Path, tiny_model_dir: Path, tiny_model_dir_same_tokenizer: Path) -> Path:
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(40)]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "student": str(tiny_model_dir),
        "teacher": str(tiny_model_dir_same_tokenizer),
        "task": {"path": str(data), "n_test": 3},
        "eval": {"max_new_tokens": 3},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_taopd_eval_runs_as_the_training_evaluation_does(eval_cfg, tmp_path, monkeypatch):
    """issue 33: `taopd eval` took ~30 s where the same evaluation inside `taopd train` took
    ~1 s. The cause: eval generated with torch's default threads (one per core) while train
    uses the free cores only (`set_threads`); on a CPU shared with other jobs every parallel
    region then waits for the busy core. Eval now takes train's threads and device, and loads
    only the model it evaluates (never the teacher)."""
    import torch

    import taopd.models as models
    import taopd.training.evaluate as ev
    import taopd.training.threads as tr
    from taopd.cli import main

    before = torch.get_num_threads()
    loaded, seen = [], {}
    real_load, real_eval = models.load_model, ev.evaluate

    def load(name, *a, **kw):
        loaded.append((name, str(kw.get("device"))))
        return real_load(name, *a, **kw)

    def evaluate_spy(model, *a, **kw):
        seen.update(threads=torch.get_num_threads(), device=str(next(model.parameters()).device))
        return real_eval(model, *a, **kw)

    monkeypatch.setattr(models, "load_model", load)
    monkeypatch.setattr(ev, "evaluate", evaluate_spy)
    monkeypatch.setattr(tr, "free_cores", lambda: 1)  # another job holds every core but one
    try:
        torch.set_num_threads(2)
        out = tmp_path / "res.json"
        assert main(["eval", str(eval_cfg), "--no-progress", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    student = json.loads(eval_cfg.read_text())["student"]
    assert [name for name, _ in loaded] == [student]  # the student only, no teacher
    assert seen == {"threads": 1, "device": device}  # what train's set_threads gives
    res = json.loads(out.read_text())
    assert res["threads"] == 1 and res["device"] == device.split(":")[0]

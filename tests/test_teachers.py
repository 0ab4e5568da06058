"""teachers.py: the local and the served teacher give a step what it needs, through one
`score_rollout`; a served teacher that returns the whole vocabulary scores like the local one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from taopd.core.scores import signals_from_hidden
from taopd.data import Example, render_prompt
from taopd.models import lm_head, load_model, load_tokenizer
from taopd.training.rollout import generate, response_hidden
from taopd.training.teachers import LocalTeacher, ServedTeacher, score_rollout

QUESTIONS = ["1 + 2 =", "State the answer: 37 - 85 =", "9 + 9 ="]


class FakeServer:
    """A `TeacherServer` stand-in: top-k log-probs of a local model (k = R), greedy answers."""

    def __init__(self, model, top_k: int, answers: list[str] | None = None) -> None:
        self.model, self.top_k, self.answers = model, top_k, answers or []
        self.generated: list[list[int]] = []

    def __repr__(self) -> str:
        return "http://fake (teacher)"

    @torch.no_grad()
    def score(self, input_ids, attention_mask, response_mask, prompt_len, vocab_size):
        from taopd.training.rollout import Rollout

        roll = Rollout(input_ids, attention_mask, response_mask, prompt_len, [""] * len(input_ids))
        logits = response_hidden(self.model, roll) @ lm_head(self.model)[:vocab_size].T
        lps = torch.log_softmax(logits.float(), -1)
        top, ids = lps.topk(self.top_k, -1)
        tok = lps.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)
        return ids, top, tok * response_mask[:, prompt_len:]

    def generate(self, prompts, max_new_tokens, stop_token_ids):
        self.generated.extend(prompts)
        return self.answers[: len(prompts)]


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path, tiny_model_dir_same_tokenizer: Path):
    tok = load_tokenizer(str(tiny_model_dir))
    student = load_model(str(tiny_model_dir))
    teacher = load_model(str(tiny_model_dir_same_tokenizer))
    vocab = len(tok)
    prompts = [render_prompt(tok, q) for q in QUESTIONS]
    roll = generate(student, tok, prompts, max_new_tokens=5, seed=0)
    return SimpleNamespace(tok=tok, student=student, teacher=teacher, vocab=vocab, roll=roll)


def _student(pair):
    with torch.no_grad():
        return response_hidden(pair.student, pair.roll), lm_head(pair.student)


def test_local_teacher_view_and_loss_inputs(pair):
    t = LocalTeacher(pair.teacher, "teacher-folder")
    assert t.label == "teacher-folder" and t.full_distribution and t.model is pair.teacher
    assert not any(p.requires_grad for p in pair.teacher.parameters())
    view = t.view(pair.roll, [slice(0, 2), slice(2, 3)])  # scored in two micro-batches
    with torch.no_grad():
        whole = response_hidden(pair.teacher, pair.roll)
    torch.testing.assert_close(view.hidden, whole)
    inputs = view.loss_inputs(slice(1, 3))
    torch.testing.assert_close(inputs["teacher_hidden"], whole[1:3])
    assert inputs["teacher_weight"] is lm_head(pair.teacher)
    assert set(view.sample_inputs()) == {"h_t", "w_t"}


def test_score_rollout_local_is_signals_from_hidden(pair):
    h_s, w_s = _student(pair)
    view = LocalTeacher(pair.teacher, "t").view(pair.roll, [slice(None)])
    got = score_rollout(pair.roll, h_s, w_s, view, k=4, vocab_size=pair.vocab, chunk_size=7)
    p = pair.roll.prompt_len
    want = signals_from_hidden(
        h_s, w_s, view.hidden, view.weight, tokens=pair.roll.input_ids[:, p:], k=4,
        valid=pair.roll.response_mask[:, p:], vocab_size=pair.vocab, chunk_size=7,
    )  # fmt: skip
    for name, x in want.items():
        torch.testing.assert_close(getattr(got, name), x, msg=name)


def test_served_teacher_with_the_whole_vocabulary_scores_like_the_local_one(pair):
    """R = V: Ĉ = C and D is exact (Eq. 17); KL and entropies are not available (NaN)."""
    served = ServedTeacher(FakeServer(pair.teacher, pair.vocab), pair.vocab)
    assert served.label == "http://fake (teacher)" and not served.full_distribution
    h_s, w_s = _student(pair)
    kw = dict(k=4, vocab_size=pair.vocab, chunk_size=64)
    view = served.view(pair.roll, [slice(None)])
    got = score_rollout(pair.roll, h_s, w_s, view, **kw)
    local = LocalTeacher(pair.teacher, "t").view(pair.roll, [slice(None)])
    want = score_rollout(pair.roll, h_s, w_s, local, **kw)
    valid = pair.roll.response_mask[:, pair.roll.prompt_len :]
    for name in ("student_entropy", "disagreement", "compatibility", "overlap"):
        torch.testing.assert_close(
            getattr(got, name)[valid], getattr(want, name)[valid], atol=1e-4, rtol=1e-4, msg=name
        )
    assert bool(torch.isnan(got.reverse_kl).all())
    inputs = view.loss_inputs(slice(0, 2))
    assert set(inputs) == {"teacher_token_logprobs"}
    assert inputs["teacher_token_logprobs"].shape == valid[:2].shape
    assert set(view.sample_inputs()) == {"h_t", "w_t", "teacher_top"}


def test_teacher_accuracy_by_kind(pair):
    """The local teacher is evaluated in process; the served one through its completions."""
    calls = []
    evaluator = SimpleNamespace(
        accuracy=lambda model: calls.append(("local", model)) or 0.5,
        served_accuracy=lambda server: calls.append(("served", server)) or 0.25,
    )
    server = FakeServer(pair.teacher, 4)
    assert LocalTeacher(pair.teacher, "t").accuracy(evaluator) == 0.5
    assert ServedTeacher(server, pair.vocab).accuracy(evaluator) == 0.25
    assert calls == [("local", pair.teacher), ("served", server)]


def test_served_accuracy_scores_the_servers_completions(pair, tmp_path):
    from taopd.config import load_config
    from taopd.data import make_task
    from taopd.training.collectives import Group
    from taopd.training.evaluate import Evaluator

    task_file = tmp_path / "t.jsonl"
    task_file.write_text('{"question": "1 + 2 =", "answer": "3"}\n')
    task = make_task({"path": str(task_file)})
    examples = [Example("1 + 2 =", "3"), Example("2 + 2 =", "4")]
    acc = SimpleNamespace(process_index=0, num_processes=1, device="cpu", is_main_process=True)
    cfg = load_config(None, [])
    ev = Evaluator(task, examples, pair.tok, cfg, Group(acc), progress=False)
    server = FakeServer(pair.teacher, 4, answers=["<answer>3</answer>", "5"])
    assert ev.served_accuracy(server) == 0.5
    assert len(server.generated) == 2 and all(isinstance(i, int) for i in server.generated[0])
    assert not ev.measures_heldout_kl(ServedTeacher(server, pair.vocab))
    assert ev.measures_heldout_kl(LocalTeacher(pair.teacher, "t"))

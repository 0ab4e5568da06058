"""data.py: answer extraction, reasoning-gym splits and scoring, file tasks, prompt rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taopd.data import (
    Example,
    FileTask,
    ReasoningGymTask,
    answers_match,
    extract_answer,
    make_task,
    numbers_equal,
    reference_answer,
    render_prompt,
)
from taopd.errors import UserError

CHAIN_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}

# --------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("The answer is 173.", "173"),
        ("5 - 9 = -4", "-4"),
        ("23 - 60 = -37<|im_end|>", "-37"),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234\nmore text", "1,234"),
        ("think 3 then <answer> 42 </answer> and 7", "42"),
        ("<answer>yes</answer></s>", "yes"),
        ("It costs $1,250 in total", "1250"),
        ("  blue  <|im_end|>", "blue"),
        ("", ""),
    ],
)
def test_extract_answer(completion: str, expected: str) -> None:
    assert extract_answer(completion) == expected


def test_reference_answer_gsm8k() -> None:
    assert reference_answer("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7") == "7"
    assert reference_answer("...\n#### 1,000") == "1000"
    assert reference_answer(42) == "42"
    assert reference_answer("Paris") == "Paris"


def test_numbers_equal() -> None:
    assert numbers_equal("1,000", "1000")
    assert numbers_equal("$5", "5.0")
    assert numbers_equal("42.", "42")
    assert not numbers_equal("42", "43")
    assert not numbers_equal("forty", "40")


# --------------------------------------------------------------------------------------------
# reasoning-gym


def test_reasoning_gym_splits_do_not_overlap() -> None:
    task = ReasoningGymTask("chain_sum", CHAIN_SUM, holdout=500)
    train = task.examples("train", 500, seed=0)
    test = task.examples("test", 200, seed=0)
    assert len(train) == 500 and len(test) == 200
    assert not {e.question for e in train} & {e.question for e in test}
    # a smaller train request is a prefix of the same stream, so it cannot overlap either
    assert [e.question for e in task.examples("train", 50, seed=0)] == [
        e.question for e in train[:50]
    ]


def test_reasoning_gym_without_holdout() -> None:
    task = make_task({"name": "chain_sum", "params": CHAIN_SUM, "holdout": 0})
    assert len(task.examples("test", 10, seed=0)) == 10


def test_reasoning_gym_deterministic_and_seeded() -> None:
    task = ReasoningGymTask("chain_sum", CHAIN_SUM)
    a = [e.question for e in task.examples("train", 30, seed=3)]
    b = [e.question for e in task.examples("train", 30, seed=3)]
    c = [e.question for e in task.examples("train", 30, seed=4)]
    assert a == b
    assert a != c
    # neighbouring seeds must not give the same items shifted by one (reasoning-gym uses seed+idx)
    assert a[1:] != c[:-1]


def test_reasoning_gym_scoring() -> None:
    task = ReasoningGymTask("chain_sum", CHAIN_SUM)
    ex = task.examples("test", 1, seed=0)[0]
    assert ex.entry is not None and ex.answer == ex.entry["answer"]
    assert task.score(f"The answer is {ex.answer}.", ex) == 1.0
    assert task.correct(ex.answer, ex)
    wrong = str(int(ex.answer) + 1)
    assert task.score(f"The answer is {wrong}.", ex) == 0.0
    assert not task.correct("I do not know", ex)


def test_reasoning_gym_suffix_and_errors() -> None:
    task = make_task({"name": "chain_sum", "params": CHAIN_SUM, "suffix": "Answer with a number."})
    ex = task.examples("train", 1, seed=0)[0]
    assert ex.question.endswith("= Answer with a number.")
    with pytest.raises(UserError, match="no_such_task"):
        ReasoningGymTask("no_such_task", {})
    with pytest.raises(UserError, match="unknown split"):
        task.examples("dev", 1, seed=0)


def test_reasoning_gym_too_few_distinct_questions() -> None:
    tiny_space = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    task = ReasoningGymTask("chain_sum", tiny_space, holdout=2000)  # 200 questions, all in train
    with pytest.raises(UserError, match="too few distinct"):
        task.examples("test", 5, seed=0)


# --------------------------------------------------------------------------------------------
# Files


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_file_task_jsonl_with_split_and_gsm8k_answers(tmp_path: Path) -> None:
    rows = [
        {"question": f"q{i}", "answer": f"work...\n#### {i * 1000:,}", "split": "train"}
        for i in range(8)
    ] + [{"question": "qt", "answer": "#### 1,500", "split": "test"}]
    task = FileTask(_write_jsonl(tmp_path / "gsm.jsonl", rows))
    test = task.examples("test", 10, seed=0)
    assert [e.question for e in test] == ["qt"]  # test stops at what exists
    assert test[0].answer == "1500"
    assert task.score("so the total is $1,500.", test[0]) == 1.0
    assert task.score("#### 1500", test[0]) == 1.0
    assert task.score("1400", test[0]) == 0.0
    train = task.examples("train", 20, seed=1)
    assert len(train) == 20  # train cycles over epochs
    assert {e.question for e in train} == {f"q{i}" for i in range(8)}
    assert train == task.examples("train", 20, seed=1)


def test_file_task_hash_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    rows = [{"q": f"what is {i} + 1?", "a": str(i + 1)} for i in range(400)]
    path = _write_jsonl(tmp_path / "plain.jsonl", rows)
    task = FileTask(path, prompt_field="q", answer_field="a")
    train = {e.question for e in task.examples("train", 400, seed=0)}
    test = {e.question for e in task.examples("test", 400, seed=0)}
    assert not train & test
    assert len(train) + len(test) == 400
    assert 20 <= len(test) <= 65  # ~10%
    again = FileTask(path, prompt_field="q", answer_field="a")
    assert {e.question for e in again.examples("test", 400, seed=5)} == test


def test_file_task_parquet_and_json(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "capital of France?", "answer": "Paris", "split": "test"}] + [
        {"question": f"t{i}", "answer": str(i), "split": "train"} for i in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    task = make_task({"path": str(tmp_path / "d.parquet")})
    ex = task.examples("test", 5, seed=0)[0]
    assert ex.answer == "Paris" and ex.entry is not None
    assert task.score("Paris", ex) == 1.0
    assert task.score("paris", ex) == 0.0  # non-numeric answers compare exactly
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    assert len(FileTask(tmp_path / "d.json").examples("train", 3, seed=0)) == 3


def test_file_task_missing_field_names_file_and_fields(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "solution": "1"}])
    with pytest.raises(UserError) as info:
        FileTask(path)
    msg = str(info.value)
    assert str(path) in msg and "'question'" in msg and "prompt, solution" in msg


def test_file_task_empty_missing_and_wrong_type(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no records"):
        FileTask(empty)
    with pytest.raises(UserError, match="does not exist"):
        FileTask(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(UserError, match="jsonl"):
        FileTask(tmp_path / "data.csv")
    with pytest.raises(UserError, match="'name'.*'path'"):
        make_task({"params": {}})


# --------------------------------------------------------------------------------------------
# Prompts


def test_render_prompt_chat_template(tiny_model_dir: Path) -> None:
    from taopd.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    text = render_prompt(tok, "1 + 2 =")
    assert text == "<|im_start|>user\n1 + 2 =<|im_end|>\n<|im_start|>assistant\n"
    with_sys = render_prompt(tok, "1 + 2 =", system_prompt="Be brief.")
    assert with_sys.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    assert render_prompt(tok, "1 + 2 =", chat_template=False) == "1 + 2 =\n"


def test_example_dataclass() -> None:
    ex = Example("q", "a")
    assert ex.entry is None


def test_boxed_answers_for_math_style_data():
    from taopd.data import extract_answer, reference_answer

    assert extract_answer(r"so we get \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_answer(r"first \boxed{1}, then \boxed{x^{2}}") == "x^{2}"
    assert reference_answer(r"Hence the answer is $\boxed{12}$.") == "12"


@pytest.mark.parametrize(
    ("got", "ref"),
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"),
        ("x=3", "3"),
        ("(1,2)", "(1, 2)"),
        (r"\{1,2\}", r"\{2,1\}"),
        ("1,000", "1000"),
    ],
)
def test_answers_match_equivalent_pairs(got: str, ref: str) -> None:
    assert answers_match(got, ref)


@pytest.mark.parametrize(
    ("got", "ref"),
    [(r"\frac{1}{3}", "0.5"), (r"\pi", "3.14"), ("Paris", "London"), ("", "0"), ("42", "43")],
)
def test_answers_match_non_equivalent_pairs(got: str, ref: str) -> None:
    assert not answers_match(got, ref)


def test_file_task_scores_math_and_gsm8k_answers(tmp_path) -> None:
    rows = [
        {"question": "half?", "answer": r"The answer is $\boxed{\frac{1}{2}}$.", "split": "test"},
        {"question": "apples?", "answer": "3 + 4 = 7\n#### 7", "split": "test"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = FileTask(path)
    half, apples = task.examples("test", 2)
    half, apples = sorted((half, apples), key=lambda e: e.question != "half?")
    assert task.score(r"so it is \boxed{0.5}", half) == 1.0
    assert task.score(r"so it is \boxed{\frac{2}{4}}", half) == 1.0
    assert task.score(r"so it is \boxed{\frac{1}{3}}", half) == 0.0
    assert task.score("4 + 3 = 7\n#### 7", apples) == 1.0
    assert task.score("#### 8", apples) == 0.0


def test_worked_chain_sum_solutions_pass_reasoning_gym_scorer() -> None:
    """The CoT setting's targets: one partial sum per line, '#### answer' last; the final answer
    extracted from every solution is what reasoning-gym's own scorer accepts."""
    from taopd.data import worked_chain_sum

    assert worked_chain_sum("12 + 34 - 5") == "12 + 34 = 46\n46 - 5 = 41\n#### 41"
    assert worked_chain_sum("4 - 1 - 7") == "4 - 1 = 3\n3 - 7 = -4\n#### -4"
    params = {"min_terms": 3, "max_terms": 4, "min_digits": 1, "max_digits": 2}
    task = make_task({"name": "chain_sum", "params": params, "solution": "worked"})
    examples = task.examples("train", 300, seed=0) + task.examples("test", 100, seed=0)
    for ex in examples:
        lines = ex.solution.splitlines()
        assert len(lines) == ex.entry["metadata"]["num_terms"]  # terms − 1 sums + the answer
        assert lines[-1] == f"#### {ex.answer}"
        assert ex.target == ex.solution
        assert task.score(ex.solution, ex) == 1.0
    wrong = examples[0].solution.rsplit("#### ", 1)[0] + "#### 100000"
    assert task.score(wrong, examples[0]) == 0.0
    plain = make_task({"name": "chain_sum", "params": params}).examples("train", 3)
    assert all(ex.solution is None and ex.target == ex.answer for ex in plain)


def test_worked_solution_errors() -> None:
    from taopd.data import worked_chain_sum

    with pytest.raises(UserError, match="chain_sum"):
        make_task({"name": "basic_arithmetic", "solution": "worked"})
    with pytest.raises(UserError, match="'answer' or 'worked'"):
        make_task({"name": "chain_sum", "solution": "steps"})
    with pytest.raises(ValueError):
        worked_chain_sum("3 * 4")


# ------------------------------------------------------------------------------- prompt stream


class _Group:
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def sum_counts(self, *counts: int) -> tuple[int, ...]:
        return tuple(c * self.world for c in counts)  # every rank counted the same


def _stream(rank: int = 0, world: int = 1, limit: int = 100, overflow: str = "skip"):
    from taopd.data import Example, PromptStream

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}

        def decode(self, ids):
            return " ".join("w" for _ in ids)

    examples = [Example(f"q{i}" + " x" * (i % 4), str(i)) for i in range(10)]
    return PromptStream(examples, lambda q: q, Tok(), 3, limit, overflow, _Group(rank, world))


def test_prompt_stream_shares_batches_and_resumes():
    one = _stream()
    first = [one.next_examples(4) for _ in range(4)]  # 16 draws over 10 examples: 2 epochs
    epoch0 = [e.question for b in first for e in b][:10]
    assert sorted(epoch0) == sorted(f"q{i}" + " x" * (i % 4) for i in range(10))
    ranks = [_stream(r, 2) for r in range(2)]
    halves = [s.next_examples(4) for s in ranks]
    assert halves[0] + halves[1] == first[0]  # each rank takes its share of the same batch
    resumed = _stream()
    resumed.load_state({**one.state(), "data_pos": 8})
    assert resumed.next_examples(4) == first[2]


def test_prompt_stream_fits_prompts_and_counts_over_ranks():
    s = _stream(world=2, limit=2, overflow="truncate")
    assert s.fit(["a", "a b c d"]) == ["a", "w w"]
    assert s.state()["truncated_prompts"] == 2 and s.state()["skipped_prompts"] == 0
    s = _stream(limit=2)
    assert s.fit(["a", "a b c d"]) == ["a"] and s.skipped == 1


def test_prompt_stream_keeps_the_examples_of_the_prompts_it_returns():
    """`last_examples` lines up with `next_prompts` (skipped prompts dropped from both), so the
    trainer can grade the rollouts it writes to samples.jsonl."""
    s = _stream(limit=2)  # "qN" plus N % 4 " x": over 2 words is skipped
    for _ in range(3):
        prompts = s.next_prompts(4)
        assert prompts == [ex.question for ex in s.last_examples]
        assert all(len(p.split()) <= 2 for p in prompts)
    assert s.skipped > 0

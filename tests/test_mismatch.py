"""The `mismatch` recipe: a teacher style planted in worked solutions, its position tag, and the
validation split that learning rates are chosen on."""

from __future__ import annotations

import pytest

from taopd.config import load_config
from taopd.data import make_task, style_positions, styled_solution
from taopd.errors import UserError
from taopd.training.sft import prepare_sft, sft_cache_key

STYLES = [("» ", "line", 1), ("» ", "line", 2), ("so ", "result", 1), ("→", "result", 3)]


def _task():
    cfg = load_config("mismatch")
    return make_task(cfg.task.as_task_dict()), cfg


@pytest.mark.parametrize("marker,where,every", STYLES)
def test_every_styled_answer_passes_the_reasoning_gym_scorer(marker, where, every):
    task, cfg = _task()
    examples = task.examples("train", 300, seed=0)
    for ex in examples:
        assert ex.solution is not None
        styled = styled_solution(ex.solution, marker, where, every)
        assert task.score(ex.solution, ex) == 1.0  # the plain style
        assert task.score(styled, ex) == 1.0  # the teacher style: the same final answer
        lines = styled.split("\n")
        assert lines[-1] == ex.solution.split("\n")[-1] and marker not in lines[-1]
        steps = lines[:-1]
        marked = [i for i, line in enumerate(steps) if marker in line]
        assert marked == list(range(0, len(steps), every))
        if where == "line":
            assert all(steps[i].startswith(marker) for i in marked)
        else:
            assert all(f"= {marker}" in steps[i] for i in marked)


def test_style_positions_tag_the_marker_slots():
    # "3 + 4 = 7\n7 + 5 = 12\n#### 12" split into tokens, the teacher's style ("» " per line)
    plain = ["3", " +", " 4", " =", " 7", "\n", "7", " +", " 5", " =", " 12", "\n", "####", " 12"]
    assert style_positions(plain, "» ", "line") == [
        i in (0, 6) for i in range(len(plain))
    ]  # the first token of each step line; not the '####' line
    styled = ["»", " 3", " +", " 4", " =", " 7", "\n", "»", " 7", " =", " 12", "\n", "####", " 12"]
    tags = style_positions(styled, "» ", "line")
    assert [i for i, t in enumerate(tags) if t] == [0, 7]  # the marker tokens (and their slot)
    result = style_positions(plain, "so ", "result")
    assert [i for i, t in enumerate(result) if t] == [4, 10]  # right after ' ='


def test_validation_split_is_disjoint_from_train_and_test():
    task, cfg = _task()
    val = {e.question for e in task.examples("validation", 300, seed=0)}
    test = {e.question for e in task.examples("test", 1000, seed=0)}
    train = {e.question for e in task.examples("train", cfg.task.n_train, seed=0)}
    assert len(val) >= 250  # a few repeats inside the split are fine
    assert not val & test and not val & train
    assert task.examples("validation", 20, seed=0) == task.examples("validation", 20, seed=0)


def test_mismatch_recipe_reuses_the_cot_student_and_has_its_own_teacher():
    cot, mismatch = load_config("cot"), load_config("mismatch")
    assert mismatch.teacher_sft.style is not None
    assert sft_cache_key(mismatch, "student") == sft_cache_key(cot, "student")
    assert sft_cache_key(mismatch, "teacher") != sft_cache_key(cot, "teacher")
    other = load_config("mismatch", ["teacher_sft.style.marker=so "])
    assert sft_cache_key(other, "teacher") != sft_cache_key(mismatch, "teacher")


def test_style_needs_worked_solutions():
    cfg = load_config("mismatch", ["task.solution=answer"])
    with pytest.raises(UserError, match="task.solution: worked"):
        prepare_sft(cfg, "teacher", progress=False)

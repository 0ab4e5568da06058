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


def test_disagreement_kinds_on_a_known_batch():
    import torch

    from taopd.core.scores import TokenSignals
    from taopd.training.metrics import disagreement_kinds

    n = 40
    kl = torch.arange(n, dtype=torch.float32).reshape(2, 20)  # positions 38, 39: the top 5%
    compat = torch.ones(2, 20)
    compat[1, 19] = 0.2  # the largest-KL position sits off the student's support
    z = torch.zeros(2, 20)
    sig = TokenSignals(z, z, kl, kl, kl, compat, compat, z)
    valid = torch.ones(2, 20, dtype=torch.bool)
    teach = -kl  # teachability ranks the other way: no overlap
    out = disagreement_kinds(sig, valid, teach)
    assert out["kl_top5_incompatible"] == 0.5 and out["top5_overlap"] == 0.0
    assert out["compat_q05"] == pytest.approx(1.0) and out["compat_q95"] == 1.0
    same = disagreement_kinds(sig, valid, kl)
    assert same["top5_overlap"] == 1.0


def test_a_styled_run_tags_positions_in_metrics_samples_and_heldout_kl(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, monkeypatch
):
    import json

    from taopd.training.train import train
    from tests.test_train import tiny_cfg

    monkeypatch.setenv("TAOPD_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg(
        tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path / "run",
        "task.solution=worked", "teacher_sft.steps=1", "teacher_sft.batch_size=4",
        "teacher_sft.style={marker: '» ', where: line, every: 1}", "train.steps=1",
        "train.samples_every=1", "train.eval_before=false", "rollout.max_new_tokens=12",
    )  # fmt: skip
    summary = train(cfg, progress=False)
    (m,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 < m["style_share_all"] < 1.0  # a step line's first token is a style slot
    assert {"reverse_kl_style", "reverse_kl_other", "style_share_kl_top5"} <= set(m)
    rec = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])
    assert len(rec["kinds"]) == len(rec["tokens"]) and set(rec["kinds"]) <= {"style", "other"}
    assert rec["kinds"][0] == "style"  # the response's first token starts a step line
    for key in ("heldout_kl_style", "heldout_kl_other"):
        assert summary[key] is not None and summary[key] >= 0


def test_diagnose_mismatch_reuses_the_mismatch_fine_tunes():
    same, mismatch = load_config("diagnose-mismatch"), load_config("mismatch")
    for role in ("teacher", "student"):
        assert sft_cache_key(same, role) == sft_cache_key(mismatch, role)

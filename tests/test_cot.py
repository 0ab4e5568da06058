"""The chain-of-thought setting: worked-solution targets, the student warm start, the pilot gate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from taopd.cli import main
from taopd.config import load_config
from taopd.training.metrics import kl_concentration
from taopd.training.sft import sft_cache_key, teacher_cache_key
from taopd.training.train import train
from tests.test_train import tiny_cfg, weights


def test_kl_concentration_is_the_pilot_gate():
    kl = torch.tensor([[0.0, 0.01, 0.04, 0.2, 5.0], [0.5, 0.02, 9.0, 1.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    out = kl_concentration(kl, valid)
    x = kl[valid]
    assert out["solved_share"] == pytest.approx(float((x < 0.05).double().mean()))  # 4 of 9
    n = math.ceil(0.05 * 9)  # 1 position: the largest
    assert out["kl_top5_share"] == pytest.approx(9.0 / float(x.sum()))
    assert n == 1
    empty = kl_concentration(kl, torch.zeros_like(valid))
    assert math.isnan(empty["solved_share"]) and math.isnan(empty["kl_top5_share"])


def test_fine_tune_cache_keys():
    demo = load_config("demo")
    # the demo teacher's key predates student warm starts and worked solutions: unchanged, so
    # caches made by earlier versions stay valid
    assert teacher_cache_key(demo) == "8e2f0029005cff81"
    cot = load_config("cot")
    assert cot.task.solution == "worked" and cot.student_sft is not None
    keys = {teacher_cache_key(cot), sft_cache_key(cot, "student"), teacher_cache_key(demo)}
    assert len(keys) == 3
    same = load_config("diagnose-cot")  # the diagnostic reuses the cot recipe's fine-tunes
    assert sft_cache_key(same, "teacher") == sft_cache_key(cot, "teacher")
    assert sft_cache_key(same, "student") == sft_cache_key(cot, "student")
    answer = load_config("cot", ["task.solution=answer"])
    assert teacher_cache_key(answer) != teacher_cache_key(cot)


def test_student_warm_start_is_trained_and_cached(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("TAOPD_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg(
        tiny_model_dir,
        tiny_model_dir_same_tokenizer,
        tmp_path / "run",
        "student_sft.steps=2",
        "student_sft.batch_size=4",
        "student_sft.lr=1e-2",
        "train.steps=1",
        "train.eval_before=false",
    )
    train(cfg, progress=False)
    folder = tmp_path / "cache" / "students" / sft_cache_key(cfg, "student")
    assert (folder / "config.json").is_file() and (folder / "taopd_student.json").is_file()
    warm, base = weights(folder), weights(tiny_model_dir)
    assert any(not torch.equal(warm[k], base[k]) for k in base)  # the fine-tune moved it
    stamp = (folder / "config.json").stat().st_mtime_ns
    train(cfg.model_copy(update={"output_dir": str(tmp_path / "run2")}), progress=False)
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # reused, not redone


def test_pilot_command_prints_the_gate_and_saves_nothing(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = [
        "pilot",
        "demo",
        "--set", f"student={tiny_model_dir}",
        "--set", f"teacher={tiny_model_dir_same_tokenizer}",
        "--set", "teacher_sft=null",
        "--set", "task.n_train=32",
        "--set", "task.n_test=4",
        "--set", "train.batch_size=4",
        "--set", "rollout.max_new_tokens=5",
        "--output-dir", str(out),
        "--steps", "2",
        "--json", str(tmp_path / "pilot.json"),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "solved (KL<0.05)" in text and "KL held by top 5%" in text
    rows = json.loads((tmp_path / "pilot.json").read_text())
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["solved_share"] <= 1.0 and 0.0 < r["kl_top5_share"] <= 1.0
        assert r["n_valid"] > 0
        assert 0.0 <= r["kl_top5_incompatible"] <= 1.0 and 0.0 <= r["top5_overlap"] <= 1.0
        assert r["compat_q05"] <= r["compat_q50"] <= r["compat_q95"] <= 1.0 + 1e-6
        assert r["style_share_all"] is None  # no planted style in the demo
    assert "top-5% overlap" in text
    assert "Teachability vs reverse KL:" in text  # the verdict in words
    assert not out.exists()  # a scratch folder: the configured run folder is never touched


@pytest.mark.parametrize(
    ("off", "overlap", "words"),
    [
        (0.02, 0.9, "nearly the same positions"),
        (0.7, 0.28, "they can differ here (70% of the top 5% by reverse KL have C < 0.5"),
        (0.3, 0.5, "differ in part"),
        (None, None, "not measurable"),
    ],
)
def test_pilot_says_in_words_whether_teachability_and_reverse_kl_can_differ(off, overlap, words):
    from taopd.experiments.pilot import pilot_verdict

    rows = [{"kl_top5_incompatible": off, "top5_overlap": overlap}] * 2
    assert words in pilot_verdict(rows)

"""The real path (slow): bundled SmolLM2, a briefly fine-tuned teacher, a few TA-OPD steps."""

import json

import pytest

from taopd.config import load_config
from taopd.training.train import train


@pytest.mark.slow
def test_demo_recipe_runs_a_few_real_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("TAOPD_CACHE", str(tmp_path / "cache"))  # conversion + teacher, isolated
    out = tmp_path / "run"
    cfg = load_config(
        "demo",
        [
            f"output_dir={out}",
            "teacher_sft.steps=3",
            "teacher_sft.batch_size=4",
            "task.n_train=64",
            "task.n_test=8",
            "train.steps=3",
            "train.batch_size=4",
            "train.save_every=3",
            "train.samples_every=3",
            "eval.heldout_kl_prompts=4",
        ],
    )
    summary = train(cfg, progress=False)
    assert summary["steps"] == 3 and summary["n_test"] == 8
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["n_selected"] == -(-r["n_valid"] // 5)  # ⌈0.2·n_valid⌉
        assert r["loss"] > 0 and r["kl_selected"] >= 0
        assert r["teachability_selected"] >= r["teachability_all"]
    assert (out / "checkpoints" / "step-000003" / "model" / "config.json").exists()
    assert (out / "samples.jsonl").exists()

"""A 2-arm, 1-seed, few-step comparison on tiny models, through the CLI."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from taopd.cli import main
from taopd.compare import CSV_FIELDS, Arm, aggregate, plan_arms
from taopd.errors import UserError


def test_plan_runs_full_once_and_k_only_where_it_matters():
    arms = plan_arms(["full", "random", "teachability"], [0.05, 0.2], 2, [5, 16], [16])
    names = {a.name for a in arms}
    assert "full-r1-k5-b16-s0" in names and not any(
        a.strategy == "full" and a.ratio != 1 for a in arms
    )
    assert sum(a.strategy == "random" for a in arms) == 2 * 2  # ratios × seeds, one K
    assert sum(a.strategy == "teachability" for a in arms) == 2 * 2 * 2  # × K values
    with pytest.raises(UserError, match="unknown strategy"):
        plan_arms(["nope"], [0.1], 1, [16], [16])


def test_aggregate_interval_over_seeds():
    rows = [
        dict(
            strategy="teachability",
            ratio=0.2,
            k=16,
            batch_size=8,
            seed=s,
            accuracy=a,
            tokens_trained=10,
            wall_seconds=1.0,
            heldout_kl=0.5,
        )
        for s, a in enumerate([0.4, 0.5, 0.6])
    ]
    (agg,) = aggregate(rows)
    assert agg["accuracy"] == pytest.approx(0.5)
    assert agg["accuracy_ci95"] == pytest.approx(4.303 * 0.1 / 3**0.5, rel=1e-3)


def test_two_arm_comparison_end_to_end_and_resumable(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, capsys
):
    cfg = {
        "student": str(tiny_model_dir),
        "teacher": str(tiny_model_dir_same_tokenizer),
        "task": {"n_train": 32, "n_test": 6},
        "rollout": {"max_new_tokens": 4},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 1, "tensorboard": False},
        "eval": {"max_new_tokens": 3, "heldout_kl_prompts": 4},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sweep"
    argv = [
        "compare",
        str(path),
        "--strategies",
        "full,teachability",
        "--ratios",
        "0.25",
        "--seeds",
        "1",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["strategy"] for r in rows} == {"full", "teachability"}
    assert set(CSV_FIELDS) <= set(rows[0])
    by = {r["strategy"]: r for r in rows}
    assert int(by["teachability"]["tokens_trained"]) < int(by["full"]["tokens_trained"])
    assert (out / "results.md").read_text().count("| teachability | 0.25 |") == 1
    assert (out / "plots" / "learning_curves.png").exists()
    assert (out / "report.html").exists()
    # a second call reruns nothing: the finished arms' summaries stay untouched
    arm = out / "arms" / Arm("full", 1.0, 16, 4, 0).name / "summary.json"
    stamp = arm.stat().st_mtime_ns
    assert main(argv) == 0
    assert arm.stat().st_mtime_ns == stamp
    assert json.loads(arm.read_text())["steps"] == 2
    # --no-run with a wider plan trains nothing new and tables only the finished arms
    wider = [a if a != "full,teachability" else "full,teachability,random" for a in argv]
    assert main([*wider, "--no-run"]) == 0
    assert not (out / "arms" / Arm("random", 0.25, 16, 4, 0).name).exists()
    with open(out / "results.csv") as f:
        assert {r["strategy"] for r in csv.DictReader(f)} == {"full", "teachability"}
    assert "2 of 3 runs finished" in capsys.readouterr().out

"""Smoke tests of the benchmark scripts: they run on tiny models and write their tables and JSON.

No timing asserts: the numbers only have to exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_step_benchmark_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "step.json"
    proc = _run(
        [
            "benchmarks/step.py",
            "--shapes",
            "tiny",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--profile",
            "taopd",
            "--profile-top",
            "3",
            "--json",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "## tiny" in table
    assert "| arm | step s (median)" in table
    for title in ("(a) taopd full-token OPD", "(b) taopd TA-OPD", "(d) floor"):
        assert title in table
    assert "Breakdown of (b)" in table and "| scoring |" in table
    assert "| target | measured | goal | met |" in table
    data = json.loads(out.read_text())
    shape = data["shapes"]["tiny"]
    arms = shape["arms"]
    assert {"full", "taopd", "floor", "taopd-bf16", "early", "weight"} <= set(arms)
    assert "(e) early" in table and "(f) teachability-weighted" in table
    for arm in arms.values():
        assert len(arm["seconds"]) == 1 and arm["median_seconds"] > 0
        assert len(arm["peak_bytes"]) == 1
    assert set(arms["taopd"]["phase_median_seconds"]) >= {"bodies", "scoring", "selection"}
    assert shape["loss_phase"] and shape["targets"] and "taopd" in shape["profiles"]
    if data["meta"]["trl"]:  # the bench extra is installed: arm (c) ran and agrees with (a)
        assert "trl" in arms
        assert abs(arms["trl"]["loss"] - arms["full"]["loss"]) < 1e-4


def test_step_benchmark_rejects_unknown_shape():
    proc = _run(["benchmarks/step.py", "--shapes", "nope"], timeout=60)
    assert proc.returncode != 0 and "unknown shape" in proc.stderr


def test_generation_benchmark_on_a_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "gen.json"
    proc = _run(
        [
            "benchmarks/generation.py",
            "--model",
            str(tiny_model_dir),
            "--batches",
            "1,3",
            "--max-new-tokens",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| batch | KV cache | mode | tok/s |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        assert row["tokens_per_second"] > 0
        if row["mode"] == "greedy":
            assert row["checks"]["greedy_matches_trainer_logits"] == 1.0


def test_sharding_benchmark_halves_state_on_two_processes():
    """Two processes: FSDP2 keeps half of each part per rank; ZeRO-3 half the weights and
    gradients, and 3/4 of AdamW's state (its fp32 master partition is one more half)."""
    proc = _run(["benchmarks/sharding.py", "--shape", "tiny", "--port", "29541"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in proc.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| state")
    }
    assert set(rows) == {"weights", "gradients", "optimizer", "total"}

    def ratio(cell: str) -> float:
        return float(cell.split("(")[1].rstrip(")"))

    zero3 = {"weights": 0.5, "gradients": 0.5, "optimizer": 0.75, "total": 0.625}
    for key, cells in rows.items():
        assert ratio(cells[1]) == 0.5, (key, cells)
        if len(cells) == 3:  # deepspeed installed
            assert abs(ratio(cells[2]) - zero3[key]) < 0.015, (key, cells)


def test_trl_step_benchmark_prints_ratios(tmp_path):
    out = tmp_path / "trl.json"
    proc = _run(
        ["benchmarks/trl_step.py", "--shape", "tiny", "--repeats", "1", "--warmup", "0",
         "--threads", "1", "--batch", "4", "--completion", "16", "--json", str(out)],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| arm | step s (median) | × vanilla TRL | step s (min) |" in proc.stdout
    assert "| signals_from_hidden |" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["ratio"]) == {"vanilla", "taopd", "nocache"}
    assert data["ratio"]["vanilla"] == 1.0
    assert 0 < data["kept"] < data["valid"]


def test_eval_speed_benchmark_times_both_paths(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    out = tmp_path / "eval.json"
    proc = _run(
        ["benchmarks/eval_speed.py", "--student", str(tiny_model_dir),
         "--teacher", str(tiny_model_dir_same_tokenizer), "--n", "4", "--max-new-tokens", "3",
         "--json", str(out)],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| path | problems | threads | device | eval s | command s |" in proc.stdout
    rows = json.loads(out.read_text())
    assert list(rows) == ["train (Trainer.evaluate)", "taopd eval", "taopd eval, before the fix"]
    n = {r["n"] for r in rows.values()}
    assert len(n) == 1 and n.pop() >= 1  # the same problems on every path
    assert rows["taopd eval"]["threads"] == rows["train (Trainer.evaluate)"]["threads"]

"""scripts/merge_sweeps.py: one table from arms of two compare folders, each at its own lr."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from taopd.experiments.arms import Arm

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("merge_sweeps", ROOT / "scripts" / "merge_sweeps.py")
merge_sweeps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(merge_sweeps)


def _arm(sweep: Path, name: str, acc: float, kl: float) -> None:
    folder = sweep / "arms" / name
    folder.mkdir(parents=True)
    summary = {
        "student_accuracy_after": acc, "student_accuracy_before": 0.2, "teacher_accuracy": 0.4,
        "tokens_trained": 120, "steps": 12, "wall_seconds": 1.0, "heldout_kl": kl,
        "heldout_kl_before": 1.5, "heldout_kl_other": kl / 2, "selected_fraction": 0.05,
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    steps = [{"step": t, "kl_all": kl + 1 - t / 10, "reverse_kl_other": kl / 2} for t in (1, 2, 3)]
    cut = '{"step": 4, "kl_a' if name.endswith("-s2") else ""  # a log cut short by a kill
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in steps) + cut)


def test_merge_keeps_each_arms_lr_and_pairs_by_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for s, (acc, kl) in enumerate([(0.30, 1.2), (0.34, 1.1), (0.32, 1.0)]):
        _arm(a, f"teachability-r0.05-k16-b8-lr3e-05-s{s}", acc, kl)
        _arm(a, f"reverse_kl-r0.05-k16-b8-lr3e-05-s{s}", 0.0, 9.0)  # not selected below
        _arm(b, f"reverse_kl-r0.05-k16-b8-lr1e-05-s{s}", acc - 0.10, kl + 0.5)
    out = tmp_path / "merged"
    rc = merge_sweeps.main(
        ["--output-dir", str(out), f"{a}:teachability-*", f"{b}:reverse_kl-*-lr1e-05-s*"]
    )
    assert rc == 0
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert sorted((r["strategy"], r["lr"]) for r in rows) == sorted(
        [("teachability", "3e-05")] * 3 + [("reverse_kl", "1e-05")] * 3
    )
    assert all(float(r["accuracy"]) > 0 for r in rows)  # the lr-3e-5 reverse_kl arms stayed out
    md = (out / "results.md").read_text()
    line = next(x for x in md.splitlines() if "teachability 0.05 − reverse_kl 0.05" in x)
    assert "+10.0" in line and "ahead" in line  # +10 points on every seed
    assert (out / "plots" / "training_kl.png").stat().st_size > 10_000  # per-step KL curves


def test_merge_refuses_a_pattern_that_matches_nothing(tmp_path, capsys):
    _arm(tmp_path / "a", "teachability-r0.05-k16-b8-lr3e-05-s0", 0.3, 1.0)
    rc = merge_sweeps.main(["--output-dir", str(tmp_path / "m"), f"{tmp_path / 'a'}:full-*"])
    assert rc == 2
    assert "no finished arm matches 'full-*'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name", ["teachability+1:valid-r0.05-k16-b8-lr3e-05-s2", "full-r1-k16-b8-s0"]
)
def test_arm_names_round_trip(name):
    assert Arm.from_name(name).name == name

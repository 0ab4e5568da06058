"""A 2-arm, 1-seed, few-step comparison on tiny models, through the CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from taopd.cli import main
from taopd.errors import UserError
from taopd.experiments.compare import (
    CSV_FIELDS,
    Arm,
    aggregate,
    mean_curve,
    paired_differences,
    plan_arms,
    prune_checkpoints,
)


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


def test_plus_n_arms_are_the_released_budget_rule():
    (arm,) = plan_arms(["teachability+1"], [0.05], 1, [16], [64])
    assert (arm.strategy, arm.min_per_sequence, arm.label) == ("teachability", 1, "teachability+1")
    assert arm.name == "teachability+1-r0.05-k16-b64-s0"
    assert "selection.min_per_sequence=1" in arm.overrides()
    assert Arm.from_row({**arm.__dict__, "strategy": arm.label}) == arm
    for bad in ("teachability+0", "teachability+x", "full+1"):
        with pytest.raises(UserError):
            plan_arms([bad], [0.05], 1, [16], [16])


def test_plus_one_rule_counts():
    """64 rollouts of 3 response tokens at 5%: ⌈0.05·192⌉ = 10 by the paper's rule; the released
    rule then adds each rollout's best position where it has none: 64 kept (33%)."""
    import torch

    from taopd import select

    scores = torch.rand(64, 3, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(64, 3, dtype=torch.bool)
    paper = select(scores, valid, 0.05)
    assert int(paper.sum()) == 10
    plus = select(scores, valid, 0.05, min_per_sequence=1)
    rows_with_any = int(paper.any(1).sum())
    assert int(plus.sum()) == 10 + (64 - rows_with_any)  # 64 when the 10 sit in 10 rows
    assert bool((plus.sum(1) >= 1).all()) and bool((plus >= paper).all())


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


def tiny_compare_config(student, teacher, tmp_path, train: dict):
    """A tiny-model config file for `taopd compare` (2 steps of 4 prompts), `train` added."""
    cfg = {
        "student": str(student),
        "teacher": str(teacher),
        "task": {"n_train": 32, "n_test": 6},
        "rollout": {"max_new_tokens": 4},
        "train": {"steps": 2, "batch_size": 4, "tensorboard": False, **train},
        "eval": {"max_new_tokens": 3, "heldout_kl_prompts": 4},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_arm_comparison_end_to_end_and_resumable(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, capsys
):
    path = tiny_compare_config(
        tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, {"eval_every": 1}
    )
    out = tmp_path / "sweep"
    argv = [
        "compare",
        str(path),
        "--strategies",
        "full,teachability,teachability+1",
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
    assert {r["strategy"] for r in rows} == {"full", "teachability", "teachability+1"}
    assert set(CSV_FIELDS) <= set(rows[0])
    by = {r["strategy"]: r for r in rows}
    assert int(by["teachability"]["tokens_trained"]) < int(by["full"]["tokens_trained"])
    # the released rule keeps at least one position per rollout: never fewer, and 4 a step here
    plus = by["teachability+1"]
    assert int(plus["tokens_trained"]) >= int(by["teachability"]["tokens_trained"])
    assert float(plus["kept_per_step"]) >= 4
    for r in rows:  # the effective share is what was trained on, next to the nominal ratio
        share = int(r["tokens_trained"]) / (int(r["steps"]) * float(r["kept_per_step"]) or 1)
        assert share == pytest.approx(1.0, abs=0.05)
    md = (out / "results.md").read_text()
    assert md.count("| teachability | 0.25 |") == 1 and "| teachability+1 | 0.25 |" in md
    assert "effective share" in md and "| full | 1 | 5e-05 | 100.0% |" in md  # lr: the config's
    assert (out / "plots" / "learning_curves.png").exists()
    assert (out / "report.html").exists()
    folders = [d for d in (out / "arms").iterdir() if d.is_dir()]
    assert len(folders) == 3
    for folder in folders:  # a finished arm keeps its final weights, not its checkpoints (disk)
        assert (folder / "model" / "model.safetensors").is_file()
        assert not (folder / "checkpoints").exists()
    # a second call reruns nothing: the finished arms' summaries stay untouched
    arm = out / "arms" / Arm("full", 1.0, 16, 4, 0).name / "summary.json"
    stamp = arm.stat().st_mtime_ns
    assert main(argv) == 0
    assert arm.stat().st_mtime_ns == stamp
    assert json.loads(arm.read_text())["steps"] == 2
    # --no-run with a wider plan trains nothing new and tables only the finished arms
    plan = "full,teachability,teachability+1"
    wider = [a if a != plan else f"{plan},random" for a in argv]
    assert main([*wider, "--no-run"]) == 0
    assert not (out / "arms" / Arm("random", 0.25, 16, 4, 0).name).exists()
    with open(out / "results.csv") as f:
        got = {r["strategy"] for r in csv.DictReader(f)}
    assert got == {"full", "teachability", "teachability+1"}
    assert "3 of 4 runs finished" in capsys.readouterr().out


def test_no_run_before_any_arm_finished_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(
        ["compare", "demo", "--strategies", "teachability,random", "--seeds", "1"]
        + ["--output-dir", str(out), "--no-run", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "nothing to table" in err and "Traceback" not in err
    assert not (out / "results.md").exists()


def test_learning_curves_average_seeds_step_by_step():
    # seed 0 has its 'before' point at step 0, seed 1 does not (its first arm never finished):
    # points are matched by step, not by index, and only steps both seeds have are averaged
    s0 = [[0, 0, 0.20, 0.40], [5, 100, 0.30, 0.30], [10, 200, 0.40, 0.20]]
    s1 = [[5, 120, 0.10, 0.50], [10, 240, 0.20, None]]
    mean = mean_curve([s0, s1])
    assert [m[0] for m in mean] == [5, 10]
    assert mean[0] == pytest.approx([5, 110, 0.20, 0.40])
    assert mean[1][:3] == pytest.approx([10, 220, 0.30]) and math.isnan(mean[1][3])
    assert mean_curve([s0]) == [[float(x) for x in p] for p in s0]


def test_valid_normalization_arm_and_lr_round_trip():
    (arm,) = plan_arms(["teachability:valid"], [0.05], 1, [16], [8])
    assert (arm.strategy, arm.normalize, arm.label) == (
        "teachability",
        "valid",
        "teachability:valid",
    )
    assert "loss.normalize=valid" in arm.overrides()
    with_lr = Arm(**{**arm.__dict__, "lr": 3e-5})
    assert with_lr.name == "teachability:valid-r0.05-k16-b8-lr3e-05-s0"
    assert "optim.lr=3e-05" in with_lr.overrides()
    row = {**with_lr.__dict__, "strategy": with_lr.label}
    assert Arm.from_row(row) == with_lr
    with pytest.raises(UserError, match="'kept' or 'valid'"):
        plan_arms(["teachability:mean"], [0.05], 1, [16], [8])


def test_weight_mode_arms_train_every_position_and_round_trip_their_names():
    arms = plan_arms(["teachability@weight", "iw_opd", "early"], [0.05], 1, [16], [8])
    assert [(a.label, a.ratio) for a in arms] == [
        ("teachability@weight", 1.0), ("iw_opd@weight", 1.0), ("early", 0.05),
    ]  # fmt: skip
    for a in arms:
        assert Arm.from_name(a.name) == a
        assert f"selection.mode={a.mode}" in a.overrides()
    with pytest.raises(UserError, match="after '@'"):
        plan_arms(["teachability@soft"], [0.05], 1, [16], [8])
    with pytest.raises(UserError, match="no '\\+N'"):
        plan_arms(["teachability+1@weight"], [0.05], 1, [16], [8])


def test_paired_differences_match_seeds_and_name_the_outcome():
    def row(strategy, ratio, seed, acc, kl):
        return dict(strategy=strategy, ratio=ratio, k=16, batch_size=8, seed=seed, accuracy=acc,
                    heldout_kl=kl)  # fmt: skip

    rows = [row("teachability", 0.05, s, 0.30 + 0.01 * s, 0.20) for s in range(3)]
    rows += [row("random", 0.05, s, 0.10 + 0.02 * s, 0.50 + 0.01 * s) for s in range(3)]
    rows += [row("full", 1.0, s, a, 0.21) for s, a in enumerate([0.25, 0.40, 0.30])]
    rows += [row("random", 0.1, 0, 0.9, 0.1)]  # another ratio: never paired with 5%
    rows += [row("iw_opd@weight", 1.0, s, 0.33, 0.19) for s in range(3)]  # an all-token rule
    diffs = {d["difference"]: d for d in paired_differences(rows)}
    assert set(diffs) == {
        "teachability 0.05 − random 0.05", "teachability 0.05 − full", "random 0.05 − full",
        "random 0.1 − full", "iw_opd@weight 1 − full", "iw_opd@weight 1 − teachability 0.05",
    }  # fmt: skip
    iw = diffs["iw_opd@weight 1 − teachability 0.05"]
    assert iw["heldout_kl"] == pytest.approx((-0.01, -0.01, -0.01))
    assert iw["heldout_kl_word"] == "ahead" and iw["heldout_kl_other"] is None
    rnd = diffs["teachability 0.05 − random 0.05"]
    d = [0.20, 0.19, 0.18]  # per-seed accuracy differences
    half = 4.303 * 0.01 / 3**0.5
    assert rnd["accuracy"] == pytest.approx((0.19, 0.19 - half, 0.19 + half))
    assert rnd["accuracy_word"] == "ahead" and rnd["heldout_kl_word"] == "ahead"
    assert sum(d) / 3 == pytest.approx(0.19)
    full = diffs["teachability 0.05 − full"]
    assert full["accuracy_word"] == "tied" and full["seeds"] == 3


def test_lr_grid_chooses_on_validation_and_trains_the_arms_with_it(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, capsys
):
    path = tiny_compare_config(
        tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, {"eval_teacher": False}
    )
    out = tmp_path / "sweep"
    argv = ["compare", str(path), "--strategies", "full,teachability", "--ratios", "0.25",
            "--seeds", "1", "--lr-grid", "1e-6,3e-3", "--grid-steps", "2",
            "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    grid = out / "grid"
    with open(grid / "results.csv") as f:
        points = list(csv.DictReader(f))
    assert len(points) == 4 and all(p["accuracy"] == "" for p in points)  # KL only
    for p in points:
        arm_cfg = yaml.safe_load(
            (grid / "arms" / f"{Arm.from_row(_typed(p)).name}.yaml").read_text()
        )
        assert arm_cfg["eval"]["split"] == "validation" and arm_cfg["eval"]["accuracy"] is False
    choice = {
        tuple(c["arm"])[0]: c["lr"] for c in json.loads((grid / "lr_choice.json").read_text())
    }
    for strategy in ("full", "teachability"):
        mine = {float(p["lr"]): float(p["heldout_kl"]) for p in points if p["strategy"] == strategy}
        assert choice[strategy] == min(mine, key=mine.get)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["strategy"]: float(r["lr"]) for r in rows} == choice
    for r in rows:  # the test arms evaluate on the test split with accuracy
        arm_cfg = yaml.safe_load(
            (out / "arms" / f"{Arm.from_row(_typed(r)).name}.yaml").read_text()
        )
        assert (
            arm_cfg["eval"]["split"] == "test" and arm_cfg["optim"]["lr"] == choice[r["strategy"]]
        )
        assert r["accuracy"] != ""
    assert "| lr 1e-06 | lr 0.003 | chosen |" in (grid / "lr_choice.md").read_text()
    for p in points:  # grid points keep no weights at all
        folder = grid / "arms" / Arm.from_row(_typed(p)).name
        assert (folder / "summary.json").is_file()
        assert not (folder / "checkpoints").exists() and not (folder / "model").exists()
    stamp = (grid / "lr_choice.json").stat().st_mtime_ns
    points_stamp = (grid / "arms").stat().st_mtime_ns
    assert main(argv) == 0  # resumable: nothing retrained
    assert (grid / "arms").stat().st_mtime_ns == points_stamp and stamp > 0


def _typed(row):
    return {**row, "ratio": float(row["ratio"]), "k": int(row["k"]),
            "batch_size": int(row["batch_size"]), "seed": int(row["seed"])}  # fmt: skip


@pytest.mark.parametrize("keep", ["final", "all", "none"])
def test_prune_checkpoints_keeps_what_was_asked(tmp_path, keep):
    folder = tmp_path / "arm"
    for step in (2, 4):  # two complete checkpoints, as the trainer writes them
        ck = folder / "checkpoints" / f"step-{step:06d}"
        (ck / "model").mkdir(parents=True)
        (ck / "model" / "model.safetensors").write_text(f"weights {step}")
        (ck / "trainer_state.pt").write_text("adam")
        (ck / "COMPLETE").write_text(str(step))
    prune_checkpoints(folder, keep)
    if keep == "all":
        assert len(list((folder / "checkpoints").iterdir())) == 2
        assert not (folder / "model").exists()
    else:
        assert not (folder / "checkpoints").exists()
        if keep == "final":
            assert (folder / "model" / "model.safetensors").read_text() == "weights 4"
        else:
            assert not (folder / "model").exists()


def test_each_arm_is_one_tracker_run_named_after_it_grouped_by_the_sweep(tmp_path, monkeypatch):
    """The arm configs carry train.run_name (the arm) and train.tracker_group (the sweep's
    folder); a missing tracker package stops the sweep before any arm starts."""
    import sys

    from taopd.config import load_config
    from taopd.experiments.compare import run_compare

    cfg = load_config("demo", ["train.report_to=[wandb]"])
    arms = plan_arms(["teachability", "random"], [0.25], 1, [16], [8])
    out = tmp_path / "my-sweep"
    assert run_compare(cfg, out, arms, progress=False, run=False) == []  # configs written only
    for arm in arms:
        train = yaml.safe_load((out / "arms" / f"{arm.name}.yaml").read_text())["train"]
        assert train["run_name"] == arm.name and train["tracker_group"] == "my-sweep"
        assert train["report_to"] == ["wandb"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # its package missing
    with pytest.raises(UserError, match=r"pip install 'taopd\[wandb\]'"):
        run_compare(cfg, out, arms, progress=False)
    assert not list((out / "arms").glob("*.log"))  # no arm was launched

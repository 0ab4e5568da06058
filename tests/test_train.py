"""End-to-end trainer tests on tiny random Llama models (seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taopd.config import load_config
from taopd.core.selection import STRATEGIES
from taopd.data import make_task
from taopd.errors import UserError
from taopd.training.train import Trainer, TrainingError, train


def tiny_cfg(student: Path, teacher: Path, out: Path, *overrides: str):
    base = [
        f"student={student}",
        f"teacher={teacher}",
        f"output_dir={out}",
        "task.n_train=64",
        "task.n_test=8",
        "train.steps=4",
        "train.batch_size=8",
        "rollout.max_new_tokens=5",
        "eval.max_new_tokens=4",
        "eval.heldout_kl_prompts=8",
        "train.tensorboard=false",
        "train.eval_teacher=false",
    ]
    return load_config(None, base + list(overrides))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_trains_and_lowers_heldout_kl(
    strategy, tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    cfg = tiny_cfg(
        tiny_model_dir,
        tiny_model_dir_same_tokenizer,
        tmp_path / "run",
        f"selection.strategy={strategy}",
        "selection.ratio=0.3",
        "optim.lr=3e-3",
        "train.steps=6",
        "train.eval_before=false",
    )
    summary = train(cfg, progress=False)
    assert summary["steps"] == 6
    assert summary["heldout_kl"] < summary["heldout_kl_before"]  # the student moved to the teacher
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        if strategy == "full":
            assert r["n_selected"] == r["n_valid"]
        elif strategy != "q3":
            assert r["n_selected"] == -(-3 * r["n_valid"] // 10)  # ⌈0.3·n_valid⌉
        assert 0 < r["n_selected"] <= r["n_valid"]
        assert r["loss"] >= 0 and r["selected_fraction"] <= 1
    assert summary["tokens_trained"] == sum(r["n_selected"] for r in rows)


def two_step_metrics(student_dir, teacher_dir, tmp_path, *overrides: str) -> list[dict]:
    """The metrics.jsonl records of a 2-step tiny run (no evaluation before training)."""
    out = tmp_path / "run"
    cfg = tiny_cfg(student_dir, teacher_dir, out, "train.steps=2", "train.eval_before=false",
                   *overrides)  # fmt: skip
    train(cfg, progress=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_teachability_selects_higher_teachability_than_all(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    for r in two_step_metrics(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path):
        assert r["teachability_selected"] > r["teachability_all"]


def test_summary_and_checkpoint_reload(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(
        tiny_model_dir,
        tiny_model_dir_same_tokenizer,
        out,
        "train.save_every=2",
        "train.eval_every=2",
        "train.samples_every=2",
        "optim.lr=1e-3",
    )
    summary = train(cfg, progress=False)
    saved = json.loads((out / "summary.json").read_text())
    for key in (
        "teacher_accuracy",
        "student_accuracy_before",
        "student_accuracy_after",
        "n_test",
        "selected_fraction",
        "wall_seconds",
    ):
        assert key in saved
    assert saved["n_test"] == 8 and 0 <= saved["student_accuracy_after"] <= 1
    assert saved["threads"] == torch.get_num_threads() >= 1  # the count the run used
    assert summary["selected_fraction"] == pytest.approx(saved["selected_fraction"])
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000002", "step-000004"]  # keep_last=2
    from taopd.models import load_model

    reloaded = load_model(str(ckpts[-1] / "model"))
    trainer_student = weights(ckpts[-1] / "model")
    for name, p in reloaded.state_dict().items():
        if name in trainer_student:
            assert torch.equal(p, trainer_student[name])
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    n_tok = len(sample["tokens"])
    assert n_tok == len(sample["selected"]) == len(sample["signals"]["teachability"])
    assert len(sample["student_top"][0]) == 5
    # graded as the evaluation grades: the answer of the example its prompt asks (issue 33)
    task = make_task({**cfg.task.as_task_dict(), "suffix": cfg.task.prompt_suffix or None})
    examples = task.examples("train", cfg.task.n_train, seed=cfg.task.seed)
    ex = next(e for e in examples if e.question in sample["prompt"])
    assert sample["answer"] == ex.answer and isinstance(sample["correct"], bool)


def test_resume_continues_to_the_same_weights(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, monkeypatch
):
    common = (
        "train.save_every=2",
        "optim.lr=2e-3",
        "selection.ratio=0.5",
        "train.eval_before=false",
    )
    ref = tiny_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path / "a", *common)
    train(ref, progress=False)

    cfg = tiny_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path / "b", *common)
    original = Trainer.train_step

    def crash_at_3(self):
        if self.step == 2:  # step 2 was checkpointed; die while doing step 3
            raise RuntimeError("killed")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_3)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, progress=False)
    monkeypatch.setattr(Trainer, "train_step", original)
    with pytest.raises(UserError, match="--resume"):
        train(cfg, progress=False)  # the folder holds a run: refuse without --resume
    train(cfg, resume=True, progress=False)
    a = weights(tmp_path / "a" / "checkpoints" / "step-000004" / "model")
    b = weights(tmp_path / "b" / "checkpoints" / "step-000004" / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    ma = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(ma) == len(mb) == 4
    for la, lb in zip(ma, mb):
        ra, rb = json.loads(la), json.loads(lb)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["n_selected"] == rb["n_selected"]


@pytest.mark.parametrize(
    "mode", [[], ["selection.mode=weight", "selection.ratio=1"]], ids=["select", "weight"]
)
def test_micro_batches_give_the_same_step(
    mode, tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    runs = {}
    for mb in (8, 3):
        out = tmp_path / f"mb{mb}"
        cfg = tiny_cfg(
            tiny_model_dir,
            tiny_model_dir_same_tokenizer,
            out,
            "train.steps=2",
            f"train.micro_batch_size={mb}",
            "train.save_every=2",
            "optim.lr=1e-3",
            "train.eval_before=false",
            *mode,
        )
        train(cfg, progress=False)
        runs[mb] = weights(out / "checkpoints" / "step-000002" / "model")
    for k in runs[8]:
        assert torch.allclose(runs[8][k], runs[3][k], atol=1e-5), k


def test_mismatched_tokenizers_fail_before_training(
    tiny_model_dir, tiny_model_dir_other_tokenizer, tmp_path
):
    cfg = tiny_cfg(tiny_model_dir, tiny_model_dir_other_tokenizer, tmp_path / "run")
    with pytest.raises(UserError) as err:
        train(cfg, progress=False)
    assert str(tiny_model_dir) in str(err.value) and str(tiny_model_dir_other_tokenizer) in str(
        err.value
    )


def test_k_larger_than_vocab_is_refused(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path):
    cfg = tiny_cfg(
        tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path / "run", "selection.k=100000"
    )
    with pytest.raises(UserError, match="selection.k=100000 exceeds the vocabulary"):
        train(cfg, progress=False)


def test_nonfinite_losses_stop_the_run_and_keep_checkpoint(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    cfg = tiny_cfg(
        tiny_model_dir,
        tiny_model_dir_same_tokenizer,
        out,
        "train.save_every=1",
        "train.steps=6",
        "train.max_nonfinite_steps=2",
        "train.eval_before=false",
    )
    import taopd.training.train as tr

    real = tr.selective_head_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(tr, "selective_head_loss", poisoned)
    with pytest.raises(TrainingError, match="2 steps in a row had a non-finite"):
        train(cfg, progress=False)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts[-1] == "step-000003"  # step 3 was skipped (not applied) but still saved
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[2].get("skipped_nonfinite") is True
    good = weights(out / "checkpoints" / "step-000002" / "model")
    after_skip = weights(out / "checkpoints" / "step-000003" / "model")
    for k in good:
        assert torch.equal(good[k], after_skip[k]), k  # a skipped step changes nothing


def test_lora_trains_only_the_adapter_and_resumes(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    pytest.importorskip("peft")
    out = tmp_path / "run"
    cfg = tiny_cfg(
        tiny_model_dir,
        tiny_model_dir_same_tokenizer,
        out,
        "lora={r: 4, alpha: 8}",
        "optim.lr=1e-2",
        "train.steps=3",
        "train.save_every=2",
        "train.eval_before=false",
    )
    summary = train(cfg, progress=False)
    assert summary["heldout_kl"] < summary["heldout_kl_before"]
    saved = weights(out / "checkpoints" / "step-000003" / "model")
    assert saved and all("lora_" in k for k in saved)  # the adapter only, not the base weights
    cfg2 = tiny_cfg(
        tiny_model_dir,
        tiny_model_dir_same_tokenizer,
        out,
        "lora={r: 4, alpha: 8}",
        "optim.lr=1e-2",
        "train.steps=4",
        "train.save_every=2",
        "train.eval_before=false",
    )
    assert train(cfg2, resume=True, progress=False)["steps"] == 4


@pytest.mark.parametrize("micro_batch", [None, 3])
def test_step_metrics_split_the_step_into_phases(
    micro_batch, tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    from taopd.training.train import PHASES

    extra = [f"train.micro_batch_size={micro_batch}"] if micro_batch else []
    for r in two_step_metrics(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, *extra):
        phases = [r[f"{p}_seconds"] for p in PHASES]
        assert all(s > 0 for s in phases), r  # every phase ran and was timed
        # the phases tile the step from its start; only the metrics themselves come after
        assert sum(phases) <= r["step_seconds"] < sum(phases) + 1.0
        shares = [r[f"{p}_share"] for p in PHASES]
        assert shares == pytest.approx([s / r["step_seconds"] for s in phases])


def test_threads_follow_the_config_or_the_free_cores(monkeypatch):
    from taopd.training import threads as train_mod

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(train_mod.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        monkeypatch.setattr(train_mod.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
        assert train_mod.free_cores() == 1  # 4 cores, about 3 busy
        monkeypatch.setattr(train_mod.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
        assert train_mod.free_cores() == 1  # never fewer than one
        monkeypatch.setattr(train_mod.os, "getloadavg", lambda: (0.4, 0.0, 0.0))
        assert train_mod.free_cores() == 4
        monkeypatch.setattr(train_mod, "free_cores", lambda: 1)
        assert train_mod.set_threads(None, torch.device("cpu")) == 1
        assert train_mod.set_threads(2, torch.device("cpu")) == 2  # train.threads wins
    finally:
        torch.set_num_threads(before)


def test_kept_region_gradient_pass_gives_the_same_step(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    # train.grad_pass=kept backpropagates only the rows with a kept position, cut after the last
    # kept column; the loss and the update must equal the whole-batch pass (with and without
    # micro-batches, where some micro-batches keep nothing)
    runs, shares = {}, {}
    for name, extra in {
        "batch": ["train.grad_pass=batch"],
        "kept": ["train.grad_pass=kept"],
        "kept_mb": ["train.grad_pass=kept", "train.micro_batch_size=2"],
    }.items():
        out = tmp_path / name
        cfg = tiny_cfg(
            tiny_model_dir,
            tiny_model_dir_same_tokenizer,
            out,
            "train.steps=2",
            "selection.ratio=0.1",
            "train.save_every=2",
            "optim.lr=1e-3",
            "train.eval_before=false",
            *extra,
        )
        train(cfg, progress=False)
        runs[name] = weights(out / "checkpoints" / "step-000002" / "model")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        shares[name] = [r["kept_region_share"] for r in rows]
        if name == "batch":
            losses = [r["loss"] for r in rows]
        else:
            assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-5)
    assert all(0 < s < 1 for s in shares["kept"])  # 10% of positions: a strict part of the grid
    for name in ("kept", "kept_mb"):
        for k in runs["batch"]:
            assert torch.allclose(runs["batch"][k], runs[name][k], atol=1e-5), (name, k)


def test_normalize_valid_is_kept_times_kept_over_valid(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    """loss.normalize=valid divides the kept sum by the valid count: `kept` × (kept / valid)."""
    common = ("selection.ratio=0.3", "optim.lr=1e-9")
    kept = two_step_metrics(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path / "k", *common)
    valid = two_step_metrics(
        tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path / "v", *common,
        "loss.normalize=valid",
    )  # fmt: skip
    r_k, r_v = kept[0], valid[0]  # step 1: the same student, rollout and selection
    assert r_k["n_selected"] == r_v["n_selected"] < r_k["n_valid"] == r_v["n_valid"]
    ratio = r_k["n_selected"] / r_k["n_valid"]
    assert r_v["loss"] == pytest.approx(r_k["loss"] * ratio, rel=1e-5)


def test_eval_split_validation_and_no_accuracy(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    """eval.split=validation evaluates on the validation split; eval.accuracy=false skips the
    greedy accuracy (held-out KL only)."""
    cfg = tiny_cfg(
        tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path / "run", "train.steps=2",
        "train.eval_every=1", "eval.split=validation", "eval.accuracy=false",
        "train.eval_teacher=true",
    )  # fmt: skip
    summary = train(cfg, progress=False)
    assert summary["eval_split"] == "validation"
    assert summary["student_accuracy_before"] is None and summary["teacher_accuracy"] is None
    assert summary["student_accuracy_after"] is None
    assert summary["heldout_kl"] is not None and summary["heldout_kl_before"] is not None
    assert [c[2] for c in summary["accuracy_curve"]] == [None, None]


@pytest.mark.parametrize("strategy", ["teachability", "iw_opd", "early"])
def test_weight_mode_trains_every_position_with_logged_weights(
    strategy, tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    rows = two_step_metrics(
        tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path,
        f"selection.strategy={strategy}", "selection.mode=weight", "selection.ratio=1",
    )  # fmt: skip
    for r in rows:
        assert r["n_selected"] == r["n_valid"] and r["loss"] >= 0
        assert r["weight_min"] <= r["weight_max"]
        if strategy == "iw_opd":
            assert r["weight_min"] >= 1.0 and r["weight_max"] <= 1.5 + 1e-9
        else:
            assert r["weight_mean"] == pytest.approx(1.0, abs=1e-5)  # one rank: mean 1
            assert r["weight_max"] > 1.0 > r["weight_min"]
    if strategy == "teachability":  # the weights lean towards high teachability
        assert all(r["teachability_weighted"] > r["teachability_all"] for r in rows)


def test_weight_mode_with_a_budget_is_refused_before_anything_runs(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    with pytest.raises(UserError, match="means nothing"):
        tiny_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path / "run",
                 "selection.mode=weight", "selection.ratio=0.05")  # fmt: skip
    assert not (tmp_path / "run").exists()

"""Reliability: exact resume after SIGKILL, clean stop on SIGTERM, atomic checkpoints, keep_last,
non-finite steps, over-long prompts. Tiny random Llamas; the subprocess tests run the real CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import taopd.train as tr
from taopd.checkpoint import latest_checkpoint, save_checkpoint
from taopd.cli import main
from taopd.config import Config, load_config
from taopd.errors import UserError
from taopd.train import Trainer, TrainingError, train

SHORT = "What is {a} + {b}?"  # ~22 tokens with the chat template
LONG = SHORT + " Please think step by step and check the sum twice." * 3  # ~140 tokens

# Runs the real CLI, pausing inside step $TAOPD_TEST_PAUSE_AT (after the rollout and scoring,
# before the loss) until a signal arrives, so the test can kill or stop it at a known point.
PAUSING_CLI = """
import os, sys, time
from pathlib import Path
import taopd.train as tr
from taopd.cli import main

pause_at = int(os.environ["TAOPD_TEST_PAUSE_AT"])
marker = Path(os.environ["TAOPD_TEST_MARKER"])
current = {}
real_step, real_loss = tr.Trainer.train_step, tr.selective_head_loss

def train_step(self):
    current["trainer"] = self
    return real_step(self)

def loss(*args, **kwargs):
    t = current["trainer"]
    if t.step + 1 == pause_at:
        marker.write_text(str(pause_at))
        deadline = time.monotonic() + 120
        while not t.stop_requested and time.monotonic() < deadline:
            time.sleep(0.01)
    return real_loss(*args, **kwargs)

tr.Trainer.train_step, tr.selective_head_loss = train_step, loss
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def write_task(path: Path, n_train: int = 24, long_every: int = 4) -> Path:
    """A JSONL task: short sums, every `long_every`-th train question long (~140 tokens)."""
    rows = []
    for i in range(n_train):
        q = (LONG if long_every and i % long_every == long_every - 1 else SHORT).format(a=i, b=7)
        rows.append({"question": q, "answer": str(i + 7), "split": "train"})
    for i in range(8):
        rows.append(
            {"question": SHORT.format(a=50 + i, b=3), "answer": str(53 + i), "split": "test"}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_cfg(student: Path, teacher: Path, out: Path, task: Path, *overrides: str) -> Config:
    data: dict[str, Any] = {
        "student": str(student), "teacher": str(teacher), "output_dir": str(out),
        "task": {"path": str(task), "n_train": 24, "n_test": 4},
        "rollout": {"max_new_tokens": 5, "max_prompt_tokens": 40, "prompt_overflow": "skip"},
        "selection": {"ratio": 0.5},
        "optim": {"lr": 2e-3},
        "eval": {"max_new_tokens": 4, "heldout_kl_prompts": 0, "batch_size": 8},
        "train": {"steps": 6, "batch_size": 4, "save_every": 2, "tensorboard": False,
                  "eval_teacher": False, "eval_before": False, "threads": 1},
    }  # fmt: skip
    return load_config(data, list(overrides))


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((ckpt / "model").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def ckpt_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def assert_same_run(a: Path, b: Path) -> None:
    """Same final weights, per-step metrics and summary numbers (float tolerance)."""
    wa, wb = (weights(latest_checkpoint(r / "checkpoints")) for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-8)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4, abs=1e-7)
        assert ra["n_selected"] == rb["n_selected"] and ra["lr"] == rb["lr"]
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    for key in (
        "steps",
        "tokens_trained",
        "student_accuracy_after",
        "skipped_prompts",
        "truncated_prompts",
        "nonfinite_steps",
    ):
        assert sa[key] == sb[key], key
    assert sa["selected_fraction"] == pytest.approx(sb["selected_fraction"])


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("task") / "sums.jsonl")


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, tmp_path_factory):
    """An uninterrupted run of the base config (in-process)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    try:
        train(
            base_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file), progress=False
        )
    finally:
        torch.set_num_threads(n)
    assert json.loads((out / "summary.json").read_text())["skipped_prompts"] > 0
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    src = str(Path(tr.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


def launch(tmp: Path, cfg_path: Path, *args: str, pause_at: int) -> subprocess.Popen:
    script = tmp / "pausing_cli.py"
    script.write_text(PAUSING_CLI)
    env = _env()
    env.update(TAOPD_TEST_PAUSE_AT=str(pause_at), TAOPD_TEST_MARKER=str(tmp / "paused"))
    return subprocess.Popen(
        [sys.executable, str(script), "train", str(cfg_path), "--no-progress", *args],
        stdout=open(tmp / "stdout.txt", "w"),
        stderr=open(tmp / "stderr.txt", "w"),
        env=env,
        cwd=tmp,
        start_new_session=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{path.name} did not appear in {timeout} s")
        time.sleep(0.02)


def test_sigkill_then_resume_matches_an_uninterrupted_run(
    tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, reference_run, tmp_path
):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        base_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file).to_yaml()
    )
    proc = launch(tmp_path, cfg_path, pause_at=4)  # killed inside step 4; checkpoint at 2
    wait_for(tmp_path / "paused", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]  # step 3 was logged, not saved
    assert latest_checkpoint(out / "checkpoints").name == "step-000002"

    # debris of a writer killed mid-save, and a step folder without its COMPLETE marker
    ckpts = out / "checkpoints"
    for debris in (ckpts / ".tmp-step-000004-999999", ckpts / "step-000005"):
        (debris / "model").mkdir(parents=True)
        (debris / "trainer_state.pt").write_bytes(b"half written")
    (ckpts / ".tmp-step-000004-999999" / "COMPLETE").write_text("4")
    assert latest_checkpoint(ckpts).name == "step-000002"
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.1')  # a line cut short by the kill

    # the folder holds a run: without --resume it is refused, with it the run finishes
    assert main(["train", str(cfg_path), "--no-progress"]) == 2
    done = subprocess.run(
        [sys.executable, "-m", "taopd", "train", str(cfg_path), "--resume", "--no-progress"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, reference_run)
    names = ckpt_names(out)
    assert not [n for n in names if n.startswith(".tmp-")]  # stale temp folders are removed
    assert [n for n in names if (ckpts / n / "COMPLETE").exists()] == [
        "step-000004",
        "step-000006",
    ]  # keep_last=2


def test_sigterm_saves_and_exits_cleanly_then_resume_finishes(
    tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, reference_run, tmp_path, capsys
):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        base_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file).to_yaml()
    )
    proc = launch(tmp_path, cfg_path, pause_at=3)
    wait_for(tmp_path / "paused", proc)
    os.kill(proc.pid, signal.SIGTERM)  # arrives inside step 3: it finishes, saves, exits
    assert proc.wait(timeout=120) == 2
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err
    assert "SIGTERM: stopping after this step" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("taopd: error: stopped by a signal at step 3; checkpoint saved")
    assert "step-000003" in last and last.endswith("continue with --resume")
    assert latest_checkpoint(out / "checkpoints").name == "step-000003"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert not (out / "summary.json").exists()

    assert main(["train", str(cfg_path), "--resume", "--no-progress"]) == 0
    assert_same_run(out, reference_run)


def test_a_second_signal_quits_at_once(capsys):
    t = Trainer.__new__(Trainer)
    t.stop_requested, t.acc = False, SimpleNamespace(is_main_process=True)
    t._on_signal(signal.SIGINT, None)
    assert t.stop_requested
    assert "SIGINT: stopping after this step" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        t._on_signal(signal.SIGINT, None)


def test_incomplete_checkpoints_are_never_picked_up(tmp_path):
    root = tmp_path / "checkpoints"
    state = {"step": 0}
    save_checkpoint(root, 1, lambda d: d.mkdir(), state)
    assert latest_checkpoint(root) == root / "step-000001"
    (root / ".tmp-step-000003-12345" / "model").mkdir(parents=True)  # a killed writer
    (root / ".tmp-step-000003-12345" / "COMPLETE").write_text("3")
    (root / "step-000002" / "model").mkdir(parents=True)  # renamed but no COMPLETE marker
    (root / "step-000002" / "trainer_state.pt").write_bytes(b"")
    (root / "step-000004").mkdir()  # COMPLETE but no trainer state
    (root / "step-000004" / "COMPLETE").write_text("4")
    assert latest_checkpoint(root) == root / "step-000001"
    assert latest_checkpoint(tmp_path / "nothing-here") is None

    def dies_while_writing(d: Path) -> None:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 5, dies_while_writing, state)
    assert latest_checkpoint(root) == root / "step-000001"  # the half-written step 5 is not
    assert not (root / "step-000005").exists()


def test_keep_last_bounds_the_checkpoints_on_disk(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 7):
        save_checkpoint(root, step, lambda d: d.mkdir(), {"step": step}, keep_last=3)
        complete = sorted(p.name for p in root.glob("step-*"))
        assert complete == [f"step-{s:06d}" for s in range(max(1, step - 2), step + 1)]
    save_checkpoint(root, 6, lambda d: d.mkdir(), {"step": 6}, keep_last=1)  # same step again
    assert sorted(p.name for p in root.iterdir()) == ["step-000006"]


def test_keep_last_in_a_run(tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, tmp_path):
    out = tmp_path / "run"
    cfg = base_cfg(
        tiny_model_dir,
        tiny_model_dir_same_tokenizer,
        out,
        task_file,
        "train.steps=3",
        "train.save_every=1",
        "train.keep_last=1",
    )
    train(cfg, progress=False)
    assert ckpt_names(out) == ["step-000003"]


# ------------------------------------------------------------------------------- non-finite


def _poison(monkeypatch, bad_calls: set[int], where: str = "loss") -> None:
    """Make the loss (or the student's gradients) of the given loss calls non-finite."""
    real = tr.selective_head_loss
    calls = {"n": 0}

    def poisoned(hidden, *args, **kwargs):
        calls["n"] += 1
        bad = calls["n"] in bad_calls
        if bad and where == "grad":
            hidden.register_hook(lambda g: g * float("inf"))
        loss = real(hidden, *args, **kwargs)
        return loss * float("nan") if bad and where == "loss" else loss

    monkeypatch.setattr(tr, "selective_head_loss", poisoned)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_nonfinite_step_is_skipped_counted_and_logged(
    where, tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    cfg = base_cfg(
        tiny_model_dir,
        tiny_model_dir_same_tokenizer,
        out,
        task_file,
        "train.steps=3",
        "train.save_every=1",
        "rollout.prompt_overflow=truncate",
    )
    _poison(monkeypatch, {2}, where)
    summary = train(cfg, progress=False)
    assert summary["steps"] == 3 and summary["nonfinite_steps"] == 1
    rows = metrics(out)
    assert [r.get("skipped_nonfinite", False) for r in rows] == [False, True, False]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1]
    if where == "grad":
        assert math.isfinite(rows[1]["loss"])  # a finite loss with a non-finite gradient
    assert summary["tokens_trained"] == rows[0]["n_selected"] + rows[2]["n_selected"]
    ckpts = out / "checkpoints"  # keep_last=2: steps 2 and 3
    w2, w3 = weights(ckpts / "step-000002"), weights(ckpts / "step-000003")
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # training went on after the skip


def test_nonfinite_in_a_row_stops_keeps_checkpoint_and_resume_takes_a_lower_lr(
    tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    common = (
        "train.steps=4",
        "train.save_every=1",
        "train.max_nonfinite_steps=2",
        "rollout.prompt_overflow=truncate",
    )
    cfg = base_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file, *common)
    _poison(monkeypatch, {2, 3, 4})
    with pytest.raises(TrainingError) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert "2 steps in a row had a non-finite loss or gradient (step 3)" in msg
    assert "step-000002" in msg and "--resume" in msg and "optim.lr" in msg
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # the stopping step is logged too
    assert [r.get("skipped_nonfinite", False) for r in rows] == [False, True, True]
    assert latest_checkpoint(out / "checkpoints").name == "step-000002"
    w1, w2 = (weights(out / "checkpoints" / f"step-00000{i}") for i in (1, 2))
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k  # a skipped step changes no weight

    monkeypatch.undo()  # the cause is fixed; resume with a lower learning rate
    lower = base_cfg(
        tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file, *common, "optim.lr=1e-4"
    )
    summary = train(lower, resume=True, progress=False)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows[2:]] == [1e-4, 1e-4]  # the new optim.lr applies
    assert summary["nonfinite_steps"] == 1  # step 2 (checkpointed); step 3 was redone


# ------------------------------------------------------------------------------- long prompts


def test_long_prompts_are_truncated_to_the_limit_and_counted(
    tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, tmp_path, monkeypatch
):
    seen: list[str] = []
    real = tr.make_sampler

    def recording(backend):
        sampler = real(backend)

        def sample(model, tokenizer, prompts, **kw):
            seen.extend(prompts)
            return sampler(model, tokenizer, prompts, **kw)

        return sample

    monkeypatch.setattr(tr, "make_sampler", recording)
    cfg = base_cfg(
        tiny_model_dir,
        tiny_model_dir_same_tokenizer,
        tmp_path / "run",
        task_file,
        "train.steps=2",
        "train.save_every=0",
        "rollout.prompt_overflow=truncate",
    )
    trainer = Trainer(cfg, progress=False)
    summary = trainer.run()
    assert len(seen) == 8
    lengths = [len(trainer.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in seen]
    assert max(lengths) <= 40
    n_long = sum(n > 30 for n in lengths)
    assert summary["truncated_prompts"] == n_long >= 1 and summary["skipped_prompts"] == 0


def test_a_batch_of_only_overlong_prompts_is_skipped_without_crashing(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    task = write_task(tmp_path / "long.jsonl", long_every=1)  # every train prompt is long
    out = tmp_path / "run"
    cfg = base_cfg(
        tiny_model_dir,
        tiny_model_dir_same_tokenizer,
        out,
        task,
        "train.steps=3",
        "train.save_every=2",
    )
    summary = train(cfg, progress=False)
    assert summary["steps"] == 3 and summary["tokens_trained"] == 0
    assert summary["skipped_prompts"] == 12 and summary["truncated_prompts"] == 0
    assert ckpt_names(out) == ["step-000002", "step-000003"]  # save_every holds on empty steps


def test_prompt_counts_survive_resume(
    tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    cfg = base_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file, "train.steps=4")
    real = Trainer.train_step

    def crash_in_step_3(self):
        if self.step == 2:
            raise RuntimeError("killed")
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", crash_in_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, progress=False)
    monkeypatch.setattr(Trainer, "train_step", real)
    resumed = train(cfg, resume=True, progress=False)
    full = train(cfg.model_copy(update={"output_dir": str(tmp_path / "full")}), progress=False)
    assert resumed["skipped_prompts"] == full["skipped_prompts"] > 0


def test_a_second_trainer_on_a_busy_folder_is_refused(
    tmp_path, tiny_model_dir, tiny_model_dir_same_tokenizer, task_file
):
    """While one trainer holds a run folder, another (say, a relaunched arm) gets a message."""
    out = tmp_path / "run"

    def cfg() -> Config:
        return base_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file)

    first = Trainer(cfg(), progress=False)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match=rf"in use by another taopd process \(pid {os.getpid()}\)"):
        Trainer(cfg(), resume=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched
    summary = first.run()  # the holder is unaffected, and lets go when its run ends
    assert summary["steps"] == 6
    assert Trainer(cfg(), resume=True, progress=False).step == 6

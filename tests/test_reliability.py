"""Reliability: exact resume after SIGKILL, clean stop on SIGTERM, atomic checkpoints, keep_last,
non-finite steps, over-long prompts. Tiny random Llamas; the subprocess tests run the real CLI."""

from __future__ import annotations

import errno
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

import taopd.training.train as tr
from taopd.cli import main
from taopd.config import Config, load_config
from taopd.errors import UserError
from taopd.training.checkpoint import latest_checkpoint, save_checkpoint
from taopd.training.run_dir import write_marker
from taopd.training.train import Trainer, TrainingError, train

SHORT = "What is {a} + {b}?"  # ~22 tokens with the chat template
LONG = SHORT + " Please think step by step and check the sum twice." * 3  # ~140 tokens

# Runs the real CLI, pausing inside step $TAOPD_TEST_PAUSE_AT (after the rollout and scoring,
# before the loss) until a signal arrives, so the test can kill or stop it at a known point.
PAUSING_CLI = """
import os, sys, time
from pathlib import Path
import taopd.training.train as tr
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
    src = str(Path(tr.__file__).resolve().parents[2])  # .../src (tr is src/taopd/training/train.py)
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
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM  # a stop, as asked: not an error
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err and "error" not in err
    assert "SIGTERM: stopping after this step" in err
    last = err.strip().splitlines()[-1]
    assert last == (
        f"taopd: stopped by SIGTERM at step 3; checkpoint saved at "
        f"{out / 'checkpoints' / 'step-000003'}; resume with: taopd train {cfg_path} "
        f"--output-dir {out} --resume"
    )
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


# ------------------------------------------------------------------------------- bad input
# Each refusal: exit 2, one line `taopd: error: ...`, no traceback, and the output folder
# byte-for-byte as it was (or still absent).


class _Payload:
    """Unpickling this runs `touch <marker>`: what a crafted .pt file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path: Path, marker: Path) -> None:
    torch.save({"step": 2, "input_ids": _Payload(marker)}, path)


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file's bytes (folders as '<dir>'), or None when the folder does not exist."""
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


def one_line_error(stderr: str) -> str:
    """The message of a stderr that is exactly one `taopd: error: ...` line."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("taopd: error: "), stderr
    return lines[0].removeprefix("taopd: error: ")


def cli(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "taopd", *argv],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=300,
    )


def refused_cli(cwd: Path, *argv: str) -> str:
    """Run the real CLI in a subprocess; expect a refusal and return its message."""
    proc = cli(cwd, *argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    return one_line_error(proc.stderr)


def refused(capsys, *argv: str) -> str:
    """Run the CLI in this process; expect a refusal and return its message."""
    capsys.readouterr()
    rc = main([*argv, "--no-progress"] if argv[0] != "report" else list(argv))
    err = capsys.readouterr().err
    assert rc == 2, err
    return one_line_error(err)


def write_cfg(path: Path, cfg: Config) -> Path:
    path.write_text(cfg.to_yaml())
    return path


@pytest.fixture(scope="module")
def small_run(tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by the tests)."""
    out = tmp_path_factory.mktemp("small") / "run"
    cfg = base_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file, "train.steps=4")
    n = torch.get_num_threads()
    try:
        train(cfg, progress=False)
    finally:
        torch.set_num_threads(n)
    assert ckpt_names(out) == ["step-000002", "step-000004"]
    return out


@pytest.fixture
def run_copy(small_run, tmp_path, tiny_model_dir, tiny_model_dir_same_tokenizer, task_file):
    """(copy of the small run, its config file) in this test's tmp_path, without its
    summary.json: a run cut short after its last checkpoint (a finished one is not resumed)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    (out / "summary.json").unlink()
    cfg = base_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file, "train.steps=4")
    return out, write_cfg(tmp_path / "cfg.yaml", cfg)


@pytest.fixture
def fresh_cfg(tmp_path, tiny_model_dir, tiny_model_dir_same_tokenizer, task_file):
    """(output folder that does not exist yet, config file writing there)."""
    out = tmp_path / "new-run"
    cfg = base_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file)
    return out, write_cfg(tmp_path / "fresh.yaml", cfg)


# --- 1. no code from crafted files


def test_a_crafted_heldout_bank_runs_nothing(tmp_path, fresh_cfg):
    out, cfg_path = fresh_cfg
    out.mkdir()
    write_marker(out, "train")  # a run folder (an unmarked one with files is refused first)
    marker = tmp_path / "PWNED"
    write_malicious(out / "heldout_bank.pt", marker)
    msg = refused_cli(tmp_path, "train", str(cfg_path), "--no-progress", "--set",
                      "eval.heldout_kl_prompts=2")  # fmt: skip
    assert not marker.exists()
    assert msg == (
        f"held-out bank {out / 'heldout_bank.pt'} holds more than tensors and plain data (not "
        "written by this taopd); refused to load it (nothing in it was run): delete it or "
        "restore a good copy"
    )


def test_a_crafted_trainer_state_runs_nothing_and_changes_nothing(tmp_path, run_copy):
    out, cfg_path = run_copy
    marker = tmp_path / "PWNED"
    for step in ("step-000002", "step-000004"):
        write_malicious(out / "checkpoints" / step / "trainer_state.pt", marker)
    before = snapshot(out)
    msg = refused_cli(tmp_path, "train", str(cfg_path), "--resume", "--no-progress")
    assert not marker.exists()
    bad = out / "checkpoints" / "step-000004" / "trainer_state.pt"
    assert msg.startswith(f"no checkpoint in {out / 'checkpoints'} can be loaded; the newest: ")
    assert f"checkpoint file {bad} holds more than tensors and plain data" in msg
    assert snapshot(out) == before


def test_a_crafted_diagnose_bank_runs_nothing(capsys, tmp_path, fresh_cfg):
    out, cfg_path = fresh_cfg
    marker = tmp_path / "PWNED"
    bank = tmp_path / "bank.pt"
    write_malicious(bank, marker)
    msg = refused(capsys, "diagnose", str(cfg_path), "--bank", str(bank))
    assert not marker.exists()
    assert msg.startswith(f"bank {bank} holds more than tensors and plain data")
    assert not out.exists()


def test_checkpoints_and_banks_are_plain_data(small_run):
    """What taopd writes loads with weights_only=True (RNG states included)."""
    state = torch.load(
        small_run / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=True
    )
    assert isinstance(state["rng"]["python"], torch.Tensor)
    assert isinstance(state["rng"]["numpy"], torch.Tensor)
    src = Path(tr.__file__).parent
    assert not [p for p in src.rglob("*.py") if "weights_only=False" in p.read_text()]


# --- 2. never delete what taopd did not write


def _project(folder: Path) -> Path:
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "config.yaml").write_text("stray: 1\n")
    (folder / "src").mkdir()
    (folder / "src" / "main.py").write_text("print('hi')\n")
    return folder


def test_overwrite_refuses_a_folder_taopd_did_not_create(tmp_path, fresh_cfg):
    _, cfg_path = fresh_cfg
    proj = _project(tmp_path / "project")
    before = snapshot(proj)
    msg = refused_cli(tmp_path, "train", str(cfg_path), "--output-dir", str(proj), "--overwrite")
    assert msg == (
        f"output_dir {proj} was not created by taopd (no taopd-run.json) and holds .git/, "
        "config.yaml, src/; refusing to delete it: choose another output_dir (a new or empty "
        "one)"
    )
    assert snapshot(proj) == before
    msg = refused_cli(tmp_path, "train", str(cfg_path), "--output-dir", str(proj))
    assert "refusing to write into it" in msg
    assert snapshot(proj) == before


def test_a_bad_task_file_leaves_no_folder_behind(capsys, tmp_path, fresh_cfg):
    out, cfg_path = fresh_cfg
    missing = tmp_path / "missing.jsonl"
    msg = refused(capsys, "train", str(cfg_path), "--set", f"task.path={missing}")
    assert msg == f"task file {missing} does not exist"
    assert not out.exists()  # no folder, no lock file


def _corrupt_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    w = dst / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return dst


def test_a_corrupt_teacher_does_not_cost_the_old_run(
    capsys, tmp_path, run_copy, tiny_model_dir_same_tokenizer
):
    out, cfg_path = run_copy
    bad = _corrupt_copy(tiny_model_dir_same_tokenizer, tmp_path / "teacher")
    before = snapshot(out)
    msg = refused(capsys, "train", str(cfg_path), "--overwrite", "--set", f"teacher={bad}")
    assert msg.startswith(f"model folder {bad}: model.safetensors is corrupt (")
    assert msg.endswith("re-save the model with save_pretrained or copy it again")
    assert snapshot(out) == before


def test_prompts_longer_than_the_context_are_refused_up_front(
    capsys, tmp_path, run_copy, tiny_model_dir_same_tokenizer
):
    import shutil

    out, cfg_path = run_copy
    short = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir_same_tokenizer, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 24}))
    before = snapshot(out)
    msg = refused(capsys, "train", str(cfg_path), "--overwrite", "--set", f"teacher={short}")
    assert msg.startswith("training prompts of up to ")
    assert "exceed the teacher's context (24 positions, max_position_embeddings)" in msg
    assert snapshot(out) == before


def test_diagnose_checks_its_bank_before_loading_models(capsys, tmp_path, fresh_cfg, monkeypatch):
    out, cfg_path = fresh_cfg

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bank was checked")

    monkeypatch.setattr(tr, "load_model", refuse)
    missing = tmp_path / "missing.pt"
    msg = refused(capsys, "diagnose", str(cfg_path), "--bank", str(missing))
    assert msg.startswith(f"bank {missing} does not exist")
    assert not out.exists()


def test_diagnose_into_a_training_run_and_report_on_a_non_run_are_refused(
    capsys, tmp_path, run_copy
):
    out, cfg_path = run_copy
    before = snapshot(out)
    msg = refused(capsys, "diagnose", str(cfg_path), "--output-dir", str(out), "--overwrite")
    assert msg == f"output_dir {out} holds a training run; give taopd diagnose its own --output-dir"
    assert snapshot(out) == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x\n")
    msg = refused(capsys, "report", str(notes))
    assert msg == (
        f"report: {notes} is not a taopd run folder (no taopd-run.json, summary.json or "
        "metrics.jsonl); nothing written"
    )
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]


def test_saving_a_step_again_replaces_it_only_once_the_new_one_is_in(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import taopd.training.checkpoint as ck

    def save_model(d: Path) -> None:
        d.mkdir()
        save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))

    root = tmp_path / "checkpoints"
    save_checkpoint(root, 6, save_model, {"step": 6, "v": 1}, keep_last=1)
    real, calls = os.replace, []

    def dies_on_the_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between moving the old one aside and the new one in
        real(src, dst)

    monkeypatch.setattr(ck.os, "replace", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 6, save_model, {"step": 6, "v": 2}, keep_last=1)
    monkeypatch.setattr(ck.os, "replace", real)
    kept = ck.resume_checkpoint(root)  # the old step 6, under its moved-aside name
    assert kept is not None and ck.load_trainer_state(kept)["v"] == 1
    save_checkpoint(root, 6, save_model, {"step": 6, "v": 3}, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-000006"]
    assert ck.load_trainer_state(root / "step-000006")["v"] == 3


@pytest.mark.parametrize("damage", ["weights", "state"])
def test_resume_falls_back_past_a_corrupt_newest_checkpoint(capsys, run_copy, damage):
    out, cfg_path = run_copy
    newest = out / "checkpoints" / "step-000004"
    if damage == "weights":
        w = newest / "model" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:5000])
    else:
        (newest / "trainer_state.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["train", str(cfg_path), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"taopd: checkpoint {newest} cannot be loaded (" in err
    assert "resuming from step-000002, the newest one that can" in err
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert ckpt_names(out) == ["step-000002", "step-000004"]  # step 4 saved again, complete
    assert weights(newest)  # and loadable


def test_resume_with_no_loadable_checkpoint_names_the_file(capsys, run_copy):
    out, cfg_path = run_copy
    for step in ("step-000002", "step-000004"):
        (out / "checkpoints" / step / "trainer_state.pt").write_bytes(b"\x00" * 10)
    before = snapshot(out)
    msg = refused(capsys, "train", str(cfg_path), "--resume")
    bad = out / "checkpoints" / "step-000004" / "trainer_state.pt"
    assert msg.startswith(f"no checkpoint in {out / 'checkpoints'} can be loaded; the newest: ")
    assert msg.endswith(f"checkpoint file {bad} cannot be read (not a file written by taopd)")
    assert snapshot(out) == before


# --- 3. one line, exit 2, nothing changed


def test_resume_refusals(capsys, run_copy, tmp_path, tiny_model_dir, tiny_model_dir_same_tokenizer):
    out, cfg_path = run_copy
    before = snapshot(out)
    msg = refused(capsys, "train", str(cfg_path), "--resume", "--overwrite")
    assert msg.startswith("--resume and --overwrite contradict each other")
    msg = refused(
        capsys,
        "train",
        str(cfg_path),
        "--resume",
        "--set",
        f"student={tiny_model_dir_same_tokenizer}",
        "--set",
        f"teacher={tiny_model_dir}",  # not the student: that is refused before the checkpoint
    )
    assert msg.startswith(
        f"--resume: this config changes the experiment of the run in {out} (student: "
    )
    assert snapshot(out) == before
    import shutil

    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    msg = refused(capsys, "train", str(cfg_path), "--resume")
    assert msg == (
        f"--resume: the run in {out} has no checkpoint yet (it ended before its first save); "
        "start it again with --overwrite instead of --resume"
    )
    assert snapshot(out) == before
    nowhere = tmp_path / "nowhere"
    refused(capsys, "train", str(cfg_path), "--resume", "--output-dir", str(nowhere))
    assert not nowhere.exists()


def test_an_empty_config_file_is_refused(capsys, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    msg = refused(capsys, "train", str(empty))
    assert msg == (
        f"config {empty} is empty; write the keys to set (e.g. student, teacher, task), or `{{}}` "
        "for all defaults"
    )


@pytest.mark.parametrize(
    ("value", "why"),
    [("inf", "a finite number"), ("nan", "a finite number"), ("0", "greater than 0"),
     ("-1e-4", "greater than 0")],
)  # fmt: skip
def test_a_learning_rate_that_cannot_train_is_refused(capsys, fresh_cfg, value, why):
    out, cfg_path = fresh_cfg
    msg = refused(capsys, "train", str(cfg_path), "--set", f"optim.lr={value}")
    head = f"invalid config (--set optim.lr={value}): optim.lr: Input should be {why}, got "
    assert msg.startswith(head) and value in msg.removeprefix(head)  # the --set, its value
    assert not out.exists()


def test_set_with_an_empty_key_is_refused(capsys, fresh_cfg):
    out, cfg_path = fresh_cfg
    msg = refused(capsys, "train", str(cfg_path), "--set", "=1")
    assert msg.startswith("--set =1: the key is empty")
    assert not out.exists()


def test_a_batch_larger_than_the_data_is_refused(capsys, fresh_cfg):
    out, cfg_path = fresh_cfg
    msg = refused(capsys, "train", str(cfg_path), "--set", "train.batch_size=1000000000")
    assert msg == (
        "train.batch_size=1000000000 exceeds the task's 24 training examples; lower it or "
        "raise task.n_train"
    )
    assert not out.exists()


def test_out_of_memory_in_a_step_names_the_knob_and_keeps_the_checkpoint(
    capsys, fresh_cfg, monkeypatch
):
    out, cfg_path = fresh_cfg
    real = Trainer._rollout

    def oom_in_step_3(self, step):
        if step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(self, step)

    monkeypatch.setattr(Trainer, "_rollout", oom_in_step_3)
    msg = refused(capsys, "train", str(cfg_path))
    ckpt = out / "checkpoints" / "step-000002"
    assert msg == (
        f"out of memory in step 3; the last checkpoint, {ckpt}, is kept: lower "
        "train.micro_batch_size (or selection.chunk_size, loss.chunk_size), then --resume (a "
        "smaller train.batch_size or rollout.max_new_tokens changes the run: start it again with "
        "--overwrite)"
    )
    assert ckpt_names(out) == ["step-000002"] and weights(ckpt)


@pytest.mark.parametrize("kind", ["empty-parquet", "bad-parquet", "non-utf8"])
def test_unreadable_data_files_are_named(capsys, tmp_path, fresh_cfg, kind):
    out, cfg_path = fresh_cfg
    if kind == "non-utf8":
        data = tmp_path / "data.jsonl"
        data.write_bytes(b'{"question": "1 + 1?", "answer": "2"}\n{"question": "caf\xe9"}\n')
        expected = f"{data}, line 2: not UTF-8 text (byte 0xe9); re-save the file as UTF-8"
    else:
        data = tmp_path / "data.parquet"
        data.write_bytes(b"" if kind == "empty-parquet" else b"PAR1 this is not parquet")
        expected = (
            f"task file {data} is empty (0 bytes), not a parquet file"
            if kind == "empty-parquet"
            else f"task file {data} is not a readable parquet file ("
        )
    msg = refused(capsys, "train", str(cfg_path), "--set", f"task.path={data}")
    assert msg.startswith(expected)
    assert not out.exists()


def test_a_corrupt_student_names_its_folder(capsys, tmp_path, fresh_cfg, tiny_model_dir):
    out, cfg_path = fresh_cfg
    bad = _corrupt_copy(tiny_model_dir, tmp_path / "student")
    msg = refused(capsys, "train", str(cfg_path), "--set", f"student={bad}")
    assert msg.startswith(f"model folder {bad}: model.safetensors is corrupt (")
    assert not out.exists()
    assert refused(capsys, "eval", str(cfg_path), "--model", str(bad)) == msg


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--strategies", ""], "--strategies is empty: give at least one value (comma-separated)"),
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["--parallel", "0"], "--parallel must be at least 1, got 0"),
    ],
)
def test_compare_refuses_empty_sweeps(capsys, tmp_path, fresh_cfg, args, expected):
    _, cfg_path = fresh_cfg
    sweep = tmp_path / "sweep"
    assert refused(capsys, "compare", str(cfg_path), "--output-dir", str(sweep), *args) == expected
    assert not sweep.exists()


@pytest.mark.parametrize("n", ["-1", "0"])
def test_eval_refuses_a_non_positive_n(capsys, fresh_cfg, monkeypatch, n):
    _, cfg_path = fresh_cfg
    msg = refused(capsys, "eval", str(cfg_path), "--n", n)
    assert msg == f"--n must be a positive number of test problems, got {n}"


# ------------------------------------------------------------------------------- a full disk


def _enospc(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_disk_full_ends_the_run_keeps_the_checkpoint_and_resume_finishes(
    where, tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, reference_run, tmp_path,
    monkeypatch,
):  # fmt: skip
    """ENOSPC while writing the step-4 checkpoint (half of trainer_state.pt on disk) or step 5's
    metrics line: one line, the step-2 checkpoint loadable, and --resume ends on the weights and
    metrics of an uninterrupted run."""
    import taopd.training.checkpoint as ck
    import taopd.training.run_dir as rd

    out = tmp_path / "run"
    cfg = base_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file)
    full = {"on": True}
    if where == "checkpoint":
        real_save = ck.torch.save

        def save(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
            if full["on"] and Path(f).name == "trainer_state.pt" and obj.get("step") == 4:
                Path(f).write_bytes(b"half of it")
                raise _enospc(f)
            real_save(obj, f, *a, **kw)

        monkeypatch.setattr(ck.torch, "save", save)
        want_step = "step-000002"
    else:

        class FullFile:
            def __init__(self, f: Any) -> None:
                self.f = f

            def write(self, text: str) -> int:
                if '"step": 5' in text:
                    self.f.write(text[:7])  # part of the line reaches the disk
                    raise _enospc(self.f.name)
                return self.f.write(text)

            def __enter__(self) -> FullFile:
                return self

            def __exit__(self, *exc: Any) -> None:
                self.f.close()

        def full_open(path: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
            f = open(path, mode, *a, **kw)  # noqa: SIM115 (closed by the caller)
            return FullFile(f) if full["on"] and Path(path).name == "metrics.jsonl" else f

        monkeypatch.setattr(rd, "open", full_open, raising=False)
        want_step = "step-000004"
    with pytest.raises(UserError) as e:
        train(cfg, progress=False)
    msg = str(e.value)
    assert msg.startswith("disk full") and "--resume" in msg and "\n" not in msg
    assert want_step in msg
    ckpts = out / "checkpoints"
    assert latest_checkpoint(ckpts).name == want_step
    assert not list(ckpts.glob(".tmp-*"))  # the half-written checkpoint is gone
    assert tr.load_trainer_state(ckpts / want_step)["step"] == int(want_step[-1])
    full["on"] = False  # space freed
    train(cfg, resume=True, progress=False)
    assert_same_run(out, reference_run)


# ------------------------------------------------------------------------------- a rank that dies


def _rank(tmp: Path, cfg_path: Path, rank: int, port: int, *args: str, pause_at: int = 0):
    """Process `rank` of a 2-process gloo run, started as torchrun would (no agent to reap it)."""
    script = tmp / "pausing_cli.py"
    script.write_text(PAUSING_CLI)
    env = _env()
    env.update(
        TAOPD_TEST_PAUSE_AT=str(pause_at), TAOPD_TEST_MARKER=str(tmp / "paused"),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1",
    )  # fmt: skip
    return subprocess.Popen(
        [sys.executable, str(script), "train", str(cfg_path), "--no-progress", *args],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / f"stderr{rank}.txt", "w"),  # noqa: SIM115 (the child holds it)
        env=env,
        cwd=tmp,
        start_new_session=True,
    )


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp: Path, cfg_path: Path, *args: str) -> None:
    """A whole 2-process run of `cfg_path`; both processes must succeed."""
    port = _port()
    procs = [_rank(tmp, cfg_path, r, port, *args) for r in (0, 1)]
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert rcs == [0, 0], (tmp / "stderr0.txt").read_text()[-3000:]


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_hung_rank_ends_its_peer_in_bounded_time_then_resume_finishes(
    fault, tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, tmp_path
):
    """Rank 1 SIGKILLed (or hung) inside step 4, checkpoint at 2: rank 0 ends with one line at
    once (gloo sees the dead peer) or after train.collective_timeout_s, not hanging; a 2-process
    --resume then ends on the weights of an uninterrupted 2-process run."""
    out = tmp_path / "run"
    timeout = 20 if fault == "kill" else 8
    cfg = base_cfg(
        tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file,
        f"train.collective_timeout_s={timeout}",
    )  # fmt: skip
    cfg_path = write_cfg(tmp_path / "cfg.yaml", cfg)
    port = _port()
    procs = [_rank(tmp_path, cfg_path, 0, port), _rank(tmp_path, cfg_path, 1, port, pause_at=4)]
    try:
        wait_for(tmp_path / "paused", procs[1], timeout=240)
        if fault == "kill":
            os.killpg(procs[1].pid, signal.SIGKILL)
        since = time.monotonic()
        rc = procs[0].wait(timeout=timeout + 60)
        took = time.monotonic() - since
        print(f"rank 0 ended {took:.1f} s after rank 1 {fault}")
        if fault == "hang":
            assert procs[1].poll() is None  # rank 1 still hangs: the timeout ended rank 0
            assert took > timeout / 2
            os.killpg(procs[1].pid, signal.SIGKILL)
            procs[1].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    err = (tmp_path / "stderr0.txt").read_text()
    lines = [ln for ln in err.splitlines() if ln.startswith("taopd: error:")]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and "collective at step 4" in lines[0] and "--resume" in lines[0]
    assert took < timeout + 30
    assert latest_checkpoint(out / "checkpoints").name == "step-000002"

    _two_ranks(tmp_path, cfg_path, "--resume")
    ref = tmp_path / "ref"
    _two_ranks(
        tmp_path, write_cfg(tmp_path / "ref.yaml", cfg.model_copy(update={"output_dir": str(ref)}))
    )
    want, got = (weights(latest_checkpoint(r / "checkpoints")) for r in (ref, out))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(want[k], got[k], atol=2e-5), k


def test_a_real_full_disk_a_small_tmpfs(
    tiny_model_dir, tiny_model_dir_same_tokenizer, task_file, reference_run, tmp_path
):
    """The run on an 8 MiB tmpfs, filled up after the step-2 checkpoint but for 128 KiB (less
    than a checkpoint): the real ENOSPC ends it with one line; freed, --resume finishes it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        out = disk / "run"
        cfg = base_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, task_file)
        trainer = Trainer(cfg, progress=False)
        real_save = trainer.save
        fillers: list[Path] = []

        def save() -> Path | None:
            path = real_save()
            if trainer.step == 2:  # fill the disk, then free 128 KiB
                for i in range(10_000):  # bounded: 8 MiB / 64 KiB chunks
                    f = disk / f"fill-{i}"
                    try:
                        f.write_bytes(b"\0" * (64 << 10))
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                        f.unlink(missing_ok=True)
                        break
                    fillers.append(f)
                for f in fillers[-2:]:
                    f.unlink()
            return path

        trainer.save = save  # type: ignore[method-assign]
        with pytest.raises(UserError, match="^disk full") as e:
            trainer.run()
        assert "\n" not in str(e.value) and "step-000002 is intact" in str(e.value)
        assert latest_checkpoint(out / "checkpoints").name == "step-000002"
        for f in fillers:  # space freed
            f.unlink(missing_ok=True)
        train(cfg, resume=True, progress=False)
        assert_same_run(out, reference_run)
    finally:
        subprocess.run(["umount", str(disk)], check=False)

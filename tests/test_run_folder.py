"""The run folder's rules and a resumed run (issue 33, findings 1, 2 and the stop/resume
messages of 8): taopd never marks a non-empty folder it did not create, `--overwrite` removes
only what a run wrote, a resume may change only `CHANGEABLE_ON_RESUME` (printed and recorded),
a finished run is not trained again, and a requested stop is one calm line with a command that
resumes. Tiny random Llamas, in process; each run takes seconds."""

from __future__ import annotations

import json
import shlex
import signal
from pathlib import Path

import pytest
import torch
import yaml

import taopd.training.train as tr
from taopd.cli import main
from taopd.training.resume import CHANGEABLE_ON_RESUME, changeable, config_changes
from taopd.training.run_dir import MARKER, RUN_OUTPUTS, remove_run, write_marker


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cfg_file(tmp_path, tiny_model_dir, tiny_model_dir_same_tokenizer) -> Path:
    """A 2-step config (checkpoints at 1 and 2) writing to tmp_path/run."""
    rows = [
        {
            "question": f"What is {i} + 1?",
            "answer": str(i + 1),
            "split": "train" if i % 4 else "test",
        }
        for i in range(24)
    ]
    task = tmp_path / "sums.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {
        "student": str(tiny_model_dir), "teacher": str(tiny_model_dir_same_tokenizer),
        "output_dir": str(tmp_path / "run"),
        "task": {"path": str(task), "n_train": 16, "n_test": 4},
        "rollout": {"max_new_tokens": 4},
        "selection": {"ratio": 0.5},
        "eval": {"max_new_tokens": 4, "heldout_kl_prompts": 0},
        "train": {"steps": 2, "batch_size": 4, "save_every": 1, "report_to": ["none"],
                  "eval_teacher": False, "eval_before": False, "threads": 1},
    }  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(capsys, *argv: str) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = main([*argv, "--no-progress"])
    return rc, capsys.readouterr().err


def error(capsys, *argv: str) -> str:
    """The one `taopd: error:` line of a refused command."""
    rc, err = run(capsys, *argv)
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("taopd: error: "), err
    return lines[0].removeprefix("taopd: error: ")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


def no_model_loads(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(tr, "load_model", refuse)


# ------------------------------------------------------------------------ 1. folder rules


def test_a_folder_with_a_users_file_is_never_marked(capsys, cfg_file, tmp_path, monkeypatch):
    """`mkdir notes; echo x > notes/todo.txt; taopd train cfg --output-dir notes`: refused, for
    a fresh start, --overwrite and --resume alike, and notes/ stays as it was."""
    no_model_loads(monkeypatch)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x\n")
    for flags, verb in (
        ([], "write into"),
        (["--overwrite"], "delete"),
        (["--resume"], "write into"),
    ):
        msg = error(capsys, "train", str(cfg_file), "--output-dir", str(notes), *flags)
        assert msg == (
            f"output_dir {notes} was not created by taopd (no {MARKER}) and holds todo.txt; "
            f"refusing to {verb} it: choose another output_dir (a new or empty one)"
        )
        assert snapshot(notes) == {"todo.txt": b"x\n"}


def test_overwrite_keeps_a_file_the_user_added_to_a_run(capsys, cfg_file, tmp_path):
    """A marked run folder where the user later put notes: --overwrite replaces the run and
    keeps the notes (named on stderr); so does a second --overwrite."""
    out = tmp_path / "run"
    assert run(capsys, "train", str(cfg_file))[0] == 0
    (out / "notes.md").write_text("my notes\n")
    (out / "checkpoints" / "README").write_text("which step is best\n")
    rc, err = run(capsys, "train", str(cfg_file), "--overwrite", "--set", "train.steps=1")
    assert rc == 0, err
    assert (
        f"--overwrite kept what taopd did not write in {out}: checkpoints/README, notes.md" in err
    )
    assert (out / "notes.md").read_text() == "my notes\n"
    assert (out / "checkpoints" / "README").read_text() == "which step is best\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["README", "step-000001"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_remove_run_deletes_only_a_runs_outputs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    write_marker(out, "train")
    for name in RUN_OUTPUTS[1:]:
        if "." in name:
            (out / name).write_text("taopd's")
        else:
            (out / name / "sub").mkdir(parents=True)
    (out / ".summary.json.tmp-123").write_text("half")  # a killed atomic write
    (out / ".taopd.lock").write_text("1")
    (out / "checkpoints" / "step-000004" / "model").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-000005-99").mkdir()
    (out / "mine.txt").write_text("user")
    (out / "analysis").mkdir()
    kept = remove_run(out)
    assert kept == ["analysis/", "checkpoints/sub", "mine.txt"]
    left = sorted(p.name for p in out.iterdir())
    assert left == [".taopd.lock", "analysis", "checkpoints", "mine.txt"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["sub"]


# ------------------------------------------------------------------------ 2. resume


def test_resume_refuses_a_change_of_the_experiment_and_lists_it(
    capsys, cfg_file, tmp_path, monkeypatch, tiny_model_dir
):
    out = tmp_path / "run"
    assert run(capsys, "train", str(cfg_file), "--set", "train.steps=1")[0] == 0
    before = snapshot(out)
    no_model_loads(monkeypatch)
    msg = error(
        capsys, "train", str(cfg_file), "--resume", "--set", "selection.strategy=random",
        "--set", "selection.ratio=0.1", "--set", f"teacher={tiny_model_dir}",
        "--set", "train.steps=3",
    )  # fmt: skip
    teacher = yaml.safe_load(cfg_file.read_text())["teacher"]
    assert msg.startswith(
        f"--resume: this config changes the experiment of the run in {out} (teacher: {teacher} "
        f"→ {tiny_model_dir}; selection.strategy: teachability → random; selection.ratio: 0.5 → "
        f"0.1); a resumed run keeps it: resume with the settings of {out / 'config.yaml'}"
    )
    assert "train.steps" not in msg.split(");")[0]  # allowed changes are not listed
    assert snapshot(out) == before


def test_resume_accepts_more_steps_prints_and_records_them(capsys, cfg_file, tmp_path):
    out = tmp_path / "run"
    rc, err = run(capsys, "train", str(cfg_file))
    assert rc == 0 and "resuming" not in err
    rc, err = run(
        capsys, "train", str(cfg_file), "--resume", "--set", "train.steps=3",
        "--set", "train.eval_every=3", "--set", "optim.lr=1e-5",
    )  # fmt: skip
    assert rc == 0, err
    assert (
        "taopd: resuming from step 2; changed: optim.lr 5e-05 → 1e-05, train.steps 2 → 3, "
        "train.eval_every 0 → 3"
    ) in err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 3 and saved["optim"]["lr"] == 1e-5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["lr"] == 1e-5
    assert summary["resumes"] == [
        {"step": 2, "changed": {
            "train.steps": [2, 3], "train.eval_every": [0, 3], "optim.lr": [5e-05, 1e-05]}}
    ]  # fmt: skip
    rc, err = run(capsys, "train", str(cfg_file), "--resume", "--set", "train.steps=3")
    assert rc == 0 and "already finished at step 3" in err  # config.yaml now says 3 steps


def test_resuming_a_finished_run_says_so_and_changes_nothing(
    capsys, cfg_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    assert run(capsys, "train", str(cfg_file))[0] == 0
    before = snapshot(out)
    no_model_loads(monkeypatch)
    rc, err = run(capsys, "train", str(cfg_file), "--resume")
    assert rc == 0, err
    assert err.strip() == (
        f"taopd: the run in {out} already finished at step 2: nothing trained, evaluated or "
        "written; to train it further, raise train.steps (e.g. --set train.steps=4)"
    )
    assert snapshot(out) == before
    msg = error(capsys, "train", str(cfg_file), "--resume", "--set", "selection.ratio=0.2")
    assert msg.startswith("--resume: this config changes the experiment")


def test_the_trainer_does_not_rerun_a_finished_run(cfg_file, tmp_path, capsys):
    """Trainer(..., resume=True).run() (the API) on a finished run: its summary, no evaluation."""
    from taopd.config import load_config

    cfg = load_config(cfg_file)
    first = tr.train(cfg, progress=False)
    trainer = tr.Trainer(cfg, resume=True, progress=False)
    trainer.evaluate = trainer.heldout_kl = None  # calling either would fail the test
    again = trainer.run()
    assert again["steps"] == first["steps"] == 2
    assert again["student_accuracy_after"] == first["student_accuracy_after"]
    assert "already finished at step 2" in capsys.readouterr().err


def test_resume_below_the_checkpoint_is_refused(capsys, cfg_file, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, "train", str(cfg_file))[0] == 0
    (out / "summary.json").unlink()  # as if killed during the final evaluation
    msg = error(capsys, "train", str(cfg_file), "--resume", "--set", "train.steps=1")
    ckpt = out / "checkpoints" / "step-000002"
    assert msg == (
        f"--resume: train.steps=1 is below step 2 of checkpoint {ckpt}; set train.steps to 2 "
        "or more"
    )


def test_config_changes_and_the_allow_list():
    saved = {"a": 1, "train": {"steps": 2, "seed": 0}, "lora": None}
    new = {"a": 1, "train": {"steps": 3, "seed": 1}, "lora": {"r": 4}, "b": 2}
    got = [(c.field, c.saved, c.new) for c in config_changes(saved, new)]
    assert got[:3] == [("train.steps", 2, 3), ("train.seed", 0, 1), ("lora", None, {"r": 4})]
    assert [c.field for c in config_changes(saved, new, shared_only=True)] == [
        "train.steps", "train.seed", "lora"
    ]  # fmt: skip
    assert changeable("train.steps") and changeable("diagnose.ratios")
    assert not any(changeable(f) for f in ("train.seed", "selection.ratio", "student", "loss.kind"))
    assert len(set(CHANGEABLE_ON_RESUME)) == len(CHANGEABLE_ON_RESUME)


# ------------------------------------------------------------------------ 3. messages


def test_resume_without_a_checkpoint_advises_a_command_that_works(capsys, cfg_file, tmp_path):
    out = tmp_path / "run"
    msg = error(capsys, "train", str(cfg_file), "--resume")
    assert msg == (
        f"--resume: output_dir {out} does not exist, so there is nothing to resume; run the "
        "same command without --resume to start the run"
    )
    assert not out.exists()
    assert run(capsys, "train", str(cfg_file), "--set", "train.steps=1")[0] == 0  # as advised
    import shutil

    shutil.rmtree(out / "checkpoints")  # a run stopped before its first checkpoint
    msg = error(capsys, "train", str(cfg_file), "--resume")
    assert msg == (
        f"--resume: the run in {out} has no checkpoint yet (it ended before its first save); "
        "start it again with --overwrite instead of --resume"
    )
    assert error(capsys, "train", str(cfg_file)).startswith(f"output_dir {out} already holds")
    assert run(capsys, "train", str(cfg_file), "--overwrite")[0] == 0  # as advised


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_requested_stop_is_calm_saves_once_and_names_a_resume_command_that_works(
    capsys, cfg_file, tmp_path, monkeypatch, sig
):
    """Stop asked during step 1 of 2 (save_every=1): one calm line (no `error:`), exit
    128 + signal, step 1 saved once, and the printed command finishes the run."""
    out = tmp_path / "run"
    real_step, real_save = tr.Trainer.train_step, tr.save_checkpoint
    saves: list[int] = []

    def step_then_signal(self):
        metrics = real_step(self)
        if self.step == 1:
            self._on_signal(sig, None)
        return metrics

    def counting_save(root, step, *args, **kwargs):
        saves.append(step)
        return real_save(root, step, *args, **kwargs)

    monkeypatch.setattr(tr.Trainer, "train_step", step_then_signal)
    monkeypatch.setattr(tr, "save_checkpoint", counting_save)
    rc, err = run(capsys, "train", str(cfg_file), "--set", "eval.batch_size=8")
    assert rc == 128 + sig
    assert saves == [1]  # saved by save_every, not a second time on the way out
    assert "error" not in err and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    command = shlex.join(
        ["taopd", "train", str(cfg_file), "--set", "eval.batch_size=8", "--output-dir", str(out),
         "--resume"]
    )  # fmt: skip
    assert last == (
        f"taopd: stopped by {sig.name} at step 1; checkpoint saved at "
        f"{out / 'checkpoints' / 'step-000001'}; resume with: {command}"
    )
    monkeypatch.setattr(tr.Trainer, "train_step", real_step)
    rc, err = run(capsys, *shlex.split(command)[1:])
    assert rc == 0, err
    assert "taopd: resuming from step 1" in err
    assert saves == [1, 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2

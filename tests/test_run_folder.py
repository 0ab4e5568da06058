"""The run folder's rules (issue 33, finding 1): taopd never marks a non-empty folder it did
not create, and `--overwrite` removes only what a run wrote. Tiny random Llamas, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import taopd.training.train as tr
from taopd.cli import main
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

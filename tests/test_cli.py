"""Bad input gives one clear `taopd: error: ...` line (exit 2, no traceback) before heavy work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import taopd.models as models
import taopd.training.train as tr
from taopd.cli import main
from taopd.training.run_dir import write_marker


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def task_file(tmp_path) -> Path:
    rows = [
        {
            "question": f"What is {i} + 1?",
            "answer": str(i + 1),
            "split": "test" if i % 4 == 0 else "train",
        }
        for i in range(16)
    ]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def cfg_file(tmp_path, tiny_model_dir, tiny_model_dir_same_tokenizer, task_file) -> Path:
    data = {
        "student": str(tiny_model_dir), "teacher": str(tiny_model_dir_same_tokenizer),
        "output_dir": str(tmp_path / "run"),
        "task": {"path": str(task_file), "n_train": 8, "n_test": 4},
        "rollout": {"max_new_tokens": 4},
        "eval": {"max_new_tokens": 4, "heldout_kl_prompts": 0},
        "train": {"steps": 1, "batch_size": 4, "tensorboard": False, "eval_teacher": False,
                  "eval_before": False, "threads": 1},
    }  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if a model is loaded: the error must come before any heavy work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(tr, "load_model", refuse)


@pytest.fixture
def no_tokenizers(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a tokenizer was loaded before the data was checked")

    monkeypatch.setattr(models, "load_tokenizer", refuse)  # the trainer's checks load them


def user_error(capsys, *argv: str) -> str:
    """Run the CLI, expect a user error, and return its message (after 'taopd: error: ')."""
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith("taopd: error: "), err
    return err.split("taopd: error: ", 1)[1]


# ------------------------------------------------------------------------------- config


def test_unknown_keys_and_wrong_types_are_reported_together(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("colour: blue\nselection: {ratioo: 0.1}\ntrain: {steps: many}\n")
    msg = user_error(capsys, "train", str(bad))
    assert msg.startswith(f"invalid config ({bad}):")
    assert "colour: unknown key" in msg and "selection.ratioo: unknown key" in msg
    assert "train.steps: Input should be a valid integer" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("selection.ratio=0", "selection.ratio: ratio must be in (0, 1]"),
        ("selection.ratio=1.5", "selection.ratio: ratio must be in (0, 1]"),
        ("selection.ratio=-0.1", "selection.ratio: ratio must be in (0, 1]"),
        ("train.stepz=3", "train.stepz: unknown key"),
        ("selection.strategy=best", "selection.strategy: strategy must be one of"),
        ("rollout.prompt_overflow=wrap", "rollout.prompt_overflow: Input should be 'truncate'"),
        ("selection.k=0", "selection.k: Input should be greater than or equal to 1"),
        ("train.steps", "--set expects key=value"),
    ],
)
def test_bad_values_name_the_field(capsys, cfg_file, no_models, override, expected):
    assert expected in user_error(capsys, "train", str(cfg_file), "--set", override)


def test_missing_or_malformed_config_file(capsys, tmp_path):
    msg = user_error(capsys, "train", str(tmp_path / "nope.yaml"))
    assert "config file" in msg and "does not exist (shipped recipes:" in msg
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [steps: 1\n")
    msg = user_error(capsys, "train", str(broken))
    assert msg.startswith(f"config {broken} is not valid YAML at line 2, column 1: expected ','")
    assert "<unicode string>" not in msg


# ------------------------------------------------------------------------------- models


def test_missing_model_folder(capsys, cfg_file, tmp_path, no_models):
    gone = tmp_path / "no-such-model"
    msg = user_error(capsys, "train", str(cfg_file), "--set", f"student={gone}")
    assert msg.strip() == f"student model folder {gone} does not exist"
    msg = user_error(capsys, "train", str(cfg_file), "--set", f"teacher={gone}")
    assert msg.strip() == f"teacher model folder {gone} does not exist"
    empty = tmp_path / "empty-model"
    empty.mkdir()
    msg = user_error(capsys, "train", str(cfg_file), "--set", f"teacher={empty}")
    assert f"teacher model folder {empty} holds no saved model (no config.json)" in msg
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"")
    msg = user_error(capsys, "train", str(cfg_file), "--set", f"student={a_file}")
    assert f"model path {a_file} is not a folder" in msg
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_different_tokenizers(capsys, cfg_file, tiny_model_dir_other_tokenizer, no_models):
    msg = user_error(
        capsys, "train", str(cfg_file), "--set", f"teacher={tiny_model_dir_other_tokenizer}"
    )
    assert "the tokenizers of student" in msg and "differ: vocabulary sizes 320" in msg
    assert "pick models of one family" in msg


def test_k_larger_than_the_vocabulary(capsys, cfg_file, no_models):
    msg = user_error(capsys, "train", str(cfg_file), "--set", "selection.k=1000")
    assert msg.strip() == "selection.k=1000 exceeds the vocabulary size 320"


# ------------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    ("content", "extra", "expected"),
    [
        (None, [], "task file {path} does not exist"),
        ("", [], "task file {path} holds no records"),
        (
            '{"question": "1 + 1?", "answer": "2"}\n{"question": "2 + 2?"}\n',
            [],
            "task file {path}, line 2: the record has no 'answer' (task.answer_field); 1 of 2 "
            "records lack it (line 2); fields of that record: question",
        ),
        (
            '{"question": "1 + 1?", "answer": "2"}\n',
            ["task.prompt_field=problem"],
            "task file {path}, line 1: the record has no 'problem' (task.prompt_field); 1 of 1 "
            "records lack it (line 1); fields of that record: answer, question",
        ),
        (
            '{"question": "1 + 1?", "answer": "2"}\n{"question": \n',
            [],
            "{path}, line 2: not valid JSON",
        ),
    ],
    ids=["missing", "empty", "no-answer", "no-prompt", "bad-json"],
)
def test_bad_dataset_fails_before_models_and_leaves_no_run(
    capsys, cfg_file, tmp_path, no_models, no_tokenizers, content, extra, expected
):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    sets = [a for s in [f"task.path={data}", *extra] for a in ("--set", s)]
    msg = user_error(capsys, "train", str(cfg_file), *sets)
    assert expected.format(path=data) in msg
    assert not (tmp_path / "run" / "config.yaml").exists()  # fixing the data needs no --overwrite


def test_cli_subprocess_prints_one_line_and_exits_2(cfg_file, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    src = str(Path(tr.__file__).resolve().parents[2])  # .../src (tr is src/taopd/training/train.py)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "taopd",
            "train",
            str(cfg_file),
            "--no-progress",
            "--set",
            f"task.path={tmp_path / 'missing.jsonl'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    missing = tmp_path / "missing.jsonl"
    assert proc.stderr.strip() == f"taopd: error: task file {missing} does not exist"
    assert proc.stdout == ""


# ------------------------------------------------------------------------------- output folder


def test_an_existing_run_is_refused_without_resume_or_overwrite(
    capsys, cfg_file, tmp_path, no_models
):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    write_marker(out, "train")
    msg = user_error(capsys, "train", str(cfg_file))
    assert msg.strip() == (
        f"output_dir {out} already holds a run; pass --resume to continue it or --overwrite "
        "to replace it (or choose another output_dir)"
    )


def test_overwrite_keeps_the_old_run_when_the_input_is_bad(capsys, cfg_file, tmp_path, no_models):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "config.yaml").write_text("old run\n")
    write_marker(out, "train")
    msg = user_error(capsys, "train", str(cfg_file), "--overwrite", "--set", "selection.k=1000")
    assert "exceeds the vocabulary size" in msg
    assert (out / "config.yaml").read_text() == "old run\n"
    assert (out / "checkpoints" / "step-000001").is_dir()


def test_overwrite_replaces_an_old_run(capsys, cfg_file, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000009").mkdir(parents=True)
    (out / "config.yaml").write_text("old run\n")
    write_marker(out, "train")
    (out / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')
    assert main(["train", str(cfg_file), "--overwrite", "--no-progress"]) == 0
    assert "old run" not in (out / "config.yaml").read_text()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]


def test_output_under_a_file_cannot_be_written(capsys, cfg_file, tmp_path, no_models):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "run"
    msg = user_error(capsys, "train", str(cfg_file), "--output-dir", str(out))
    assert msg.strip() == f"cannot write to output_dir {out}: Not a directory"
    msg = user_error(capsys, "train", str(cfg_file), "--output-dir", str(blocker))
    assert msg.strip() == f"output_dir {blocker} exists and is not a folder"


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: chmod does not stop writes (see the path-under-a-file test)",
)
def test_read_only_output_folder(capsys, cfg_file, tmp_path, no_models):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        out = parent / "run"
        msg = user_error(capsys, "train", str(cfg_file), "--output-dir", str(out))
        assert msg.strip() == f"cannot write to output_dir {out}: Permission denied"
    finally:
        parent.chmod(0o755)

"""Experiment trackers (train.report_to): validation, the missing-package line, and 2-step runs
whose tracker records, read back offline, equal metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from taopd.config import TRACKERS, load_config
from taopd.errors import UserError
from taopd.training import trackers as trk
from taopd.training.train import Trainer, train
from tests.test_train import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


def run_cfg(student: Path, teacher: Path, out: Path, *overrides: str):
    """A 2-step tiny run with an evaluation on its last step (accuracy and held-out KL logged)."""
    return tiny_cfg(
        student, teacher, out, "train.steps=2", "train.eval_before=false", "train.eval_every=2",
        "train.threads=1", *overrides,
    )  # fmt: skip


def jsonl_metrics(out: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: numeric metrics}: what every tracker should have received."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: trk.numeric(r) for r in rows}


def assert_same(logged: dict[int, dict[str, float]], expected: dict[int, dict[str, float]]):
    """Same steps, same metric names per step, same values (1e-6; NaN equals NaN)."""
    assert sorted(logged) == sorted(expected)
    for step, want in expected.items():
        got = logged[step]
        assert sorted(got) == sorted(want), (step, set(got) ^ set(want))
        for k, v in want.items():
            same = (math.isnan(v) and math.isnan(got[k])) or math.isclose(
                got[k], v, rel_tol=1e-6, abs_tol=1e-6
            )
            assert same, (step, k, got[k], v)


# ----------------------------------------------------------------------------- config


def test_report_to_defaults_and_forms():
    train = load_config(None).train
    assert train.report_to == ["tensorboard"] and train.trackers() == ["tensorboard"]
    one = load_config(None, ["train.report_to=wandb"]).train
    assert one.report_to == ["wandb"]
    two = load_config(None, ["train.report_to=wandb,trackio"]).train
    assert two.trackers() == ["wandb", "trackio"]
    listed = load_config(None, ["train.report_to=[tensorboard, mlflow, tensorboard]"]).train
    assert listed.report_to == ["tensorboard", "mlflow"]  # repeats dropped
    assert load_config(None, ["train.report_to=[none]"]).train.trackers() == []
    # the old switch: tensorboard: false removes tensorboard, leaves the others
    old = load_config(None, ["train.tensorboard=false"]).train
    assert old.trackers() == []
    both = load_config(None, ["train.tensorboard=false", "train.report_to=[tensorboard,wandb]"])
    assert both.train.trackers() == ["wandb"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[wanb]", "unknown tracker(s) 'wanb'; choose from tensorboard, wandb, trackio, mlflow"),
        ("[none, wandb]", "none means no tracker: give it alone"),
        ("[]", "give at least one tracker, or [none]"),
    ],
)
def test_report_to_is_validated(value, message):
    with pytest.raises(UserError) as err:
        load_config(None, [f"train.report_to={value}"])
    assert "train.report_to" in str(err.value) and message in str(err.value)


def test_every_tracker_names_its_package_and_training_only_reports_nowhere():
    assert set(trk._PACKAGES) == set(TRACKERS)
    from taopd.config import training_only

    data = training_only(load_config(None, ["train.report_to=[wandb]"]), "x")
    assert load_config(data).train.trackers() == []  # the diagnostic's update, the pilot


# ----------------------------------------------------------------------------- missing package


@pytest.mark.parametrize("name", ["wandb", "trackio", "mlflow"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    cfg = load_config(None, [f"train.report_to=[{name}]"])
    with pytest.raises(UserError) as err:
        trk.check_trackers(cfg.train)
    assert str(err.value).startswith(
        f"train.report_to includes {name}, but the package {name} is not installed: "
        f"pip install 'taopd[{name}]'"
    )
    assert "\n" not in str(err.value)


def test_a_missing_tracker_package_fails_before_any_work(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    cfg = run_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, "train.report_to=[wandb]")
    with pytest.raises(UserError, match="pip install 'taopd\\[wandb\\]'"):
        Trainer(cfg, progress=False)
    assert not out.exists()  # no run folder, no model loaded


# ----------------------------------------------------------------------------- trackers


def test_tensorboard_gets_the_jsonl_metrics(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = run_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, "train.tensorboard=true")
    assert cfg.train.trackers() == ["tensorboard"]  # the default report_to
    train(cfg, progress=False)
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    logged: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            logged.setdefault(e.step, {})[tag] = e.value
    want = jsonl_metrics(out)
    assert "accuracy" in want[2] and "heldout_kl" in want[2]  # the last step's evaluation
    # TensorBoard keeps float32: compare at its precision
    for step, row in want.items():
        assert sorted(logged[step]) == sorted(row)
        for k, v in row.items():
            assert math.isclose(logged[step][k], v, rel_tol=1e-6, abs_tol=1e-6), (k, v)


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (wandb's LevelDB-style log: 32 KiB blocks of
    chunks, each with a 7-byte header of crc32, length and type; the file opens ':W&B')."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk  # full/first start a record
        if kind in (1, 4):  # full/last end it
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a .wandb file once it holds the run's exit record: wandb's core process
    may still be writing it for a moment after `finish()` has returned."""
    import time

    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(wandb_records(path))
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        except (DecodeError, struct.error):  # a record cut short: still being written
            pass
        assert time.monotonic() < deadline, f"{path} holds no exit record after {timeout} s"
        time.sleep(0.2)


def wandb_history(run_file: Path) -> tuple[dict[int, dict[str, float]], list]:
    """{step: logged values, less wandb's own (_step, _runtime, ...)} and the run records."""
    history: dict[int, dict[str, float]] = {}
    runs = []
    for r in finished_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            runs.append(r.run)
        elif kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            step = items.pop("_step")
            history.setdefault(step, {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")}
            )
    return history, runs


def test_wandb_offline_gets_the_jsonl_metrics_and_resume_reuses_the_run(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # no WANDB_DIR: the run folder (under tmp_path) holds wandb/; wandb also keeps the
    # environment of its first run in a process, which a later test's WANDB_DIR would not change
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "run"
    extra = ("train.report_to=[wandb]", "train.tracker_group=sweep", "train.save_every=1")
    train(run_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, *extra), progress=False)
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, runs = wandb_history(files[0])
    assert_same(history, jsonl_metrics(out))
    run_id = json.loads((out / trk.STATE_FILE).read_text())["wandb_id"]
    assert [(r.run_id, r.display_name, r.run_group, r.project) for r in runs] == [
        (run_id, "run", "sweep", "taopd")
    ]
    # resume (one more step): the same wandb run id, a new offline file holding step 3 only
    cfg = run_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, *extra, "train.steps=3")
    train(cfg, resume=True, progress=False)
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    later = [h for h, _ in map(wandb_history, files) if 3 in h]
    assert len(later) == 1 and sorted(later[0]) == [3]
    assert_same(later[0], {3: jsonl_metrics(out)[3]})


def test_trackio_gets_the_jsonl_metrics(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path):
    """`taopd train` in a subprocess (trackio fixes its folder, TRACKIO_DIR, on import), then
    trackio's own reader on the local database."""
    pytest.importorskip("trackio")
    out = tmp_path / "run"
    cfg = run_cfg(
        tiny_model_dir, tiny_model_dir_same_tokenizer, out,
        "train.report_to=[trackio]", "train.run_name=arm-a", "train.tracker_project=tk-test",
    )  # fmt: skip
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml())
    env = dict(
        os.environ,
        TRACKIO_DIR=str(tmp_path / "trackio"),
        PYTHONPATH=str(ROOT / "src"),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    cmd = [sys.executable, "-m", "taopd", "train", str(cfg_path), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    read = (
        "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
        "print(json.dumps(S.get_logs('tk-test', 'arm-a'), default=str))"
    )
    logs = subprocess.run(
        [sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=300
    )
    assert logs.returncode == 0, logs.stderr[-3000:]
    logged = {}
    for row in json.loads(logs.stdout.strip().splitlines()[-1]):
        step = row.pop("step")
        logged.setdefault(step, {}).update(
            {k: v for k, v in row.items() if k != "timestamp" and not k.startswith("_")}
        )
    assert_same(logged, jsonl_metrics(out))


def test_mlflow_gets_the_jsonl_metrics(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, monkeypatch
):
    """mlflow-skinny (the extra) into a local file store (opted in: MLflow 3 prefers a database)."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    extra = ("train.report_to=[mlflow]", "train.tracker_group=sweep", "train.run_name=arm-b")
    train(run_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, *extra), progress=False)
    run_id = json.loads((out / trk.STATE_FILE).read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.run_name == "arm-b" and run.data.tags["taopd.group"] == "sweep"
    assert run.data.params["selection.strategy"] == "teachability"  # the config, flattened
    logged: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            logged.setdefault(m.step, {})[key] = m.value
    assert_same(logged, jsonl_metrics(out))

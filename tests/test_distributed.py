"""Two CPU processes (accelerate launch, gloo) must train exactly like one with the same batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def launch(
    path: Path, procs: int, extra: list[str] | None = None, config_file: Path | None = None
) -> None:
    """`accelerate launch` of `taopd train path` on `procs` CPU processes."""
    launcher = str(Path(sys.executable).parent / "accelerate")
    # accelerate's --cpu launcher needs MPI for several processes; its multi-GPU launcher
    # (torchrun) runs CPU processes with gloo, and taopd uses the CPU when no GPU is present
    layout = ["--multi_gpu"] if procs > 1 else ["--cpu"]
    if config_file is not None:
        layout = ["--config_file", str(config_file)]
    cmd = [
        launcher,
        "launch",
        *layout,
        "--num_processes",
        str(procs),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "taopd",
        "train",
        str(path),
        "--no-progress",
        *(extra or []),
    ]
    run(cmd, ROOT)


@pytest.mark.parametrize("strategy", ["full", "teachability"])
def test_two_processes_equal_one(strategy, tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path):
    """Replicated (gradient all-reduce) and sharded (FSDP2) 2-process runs equal 1 process."""
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate launcher not installed")
    cfg = {
        "student": str(tiny_model_dir),
        "teacher": str(tiny_model_dir_same_tokenizer),
        "task": {"n_train": 32, "n_test": 4},
        "rollout": {"max_new_tokens": 5, "greedy": True},
        "selection": {"strategy": strategy, "ratio": 0.3},
        "optim": {"lr": 3e-3},
        "train": {
            "steps": 3,
            "batch_size": 8,
            "micro_batch_size": 2,
            "save_every": 3,
            "tensorboard": False,
            "eval_teacher": False,
            "eval_before": False,
        },
        "eval": {"max_new_tokens": 3, "heldout_kl_prompts": 4},
    }
    finals, summaries = {}, {}
    for name, procs, fsdp in (("one", 1, False), ("ddp", 2, False), ("fsdp", 2, True)):
        out = tmp_path / name
        path = tmp_path / f"{name}.yaml"
        train = {**cfg["train"], "fsdp": fsdp}
        path.write_text(yaml.safe_dump({**cfg, "train": train, "output_dir": str(out)}))
        launch(path, procs)
        finals[name] = weights(out / "checkpoints" / "step-000003" / "model")
        summaries[name] = json.loads((out / "summary.json").read_text())
        assert summaries[name]["world_size"] == procs
        assert summaries[name]["fsdp"] == fsdp
    start = weights(tiny_model_dir)
    moved = False
    for name in ("ddp", "fsdp"):
        for k in start:
            assert torch.allclose(finals["one"][k], finals[name][k], atol=2e-5), (name, k)
            moved |= not torch.allclose(finals["one"][k], start[k])
        for key in ("student_accuracy_after", "heldout_kl", "tokens_trained"):
            assert summaries[name][key] == pytest.approx(summaries["one"][key], rel=1e-4), key
    assert moved  # training changed the weights, identically in all three layouts


def test_fsdp_resume_equals_uninterrupted(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path):
    """A sharded run resumed from its step-2 checkpoint ends where the uninterrupted one did.

    Sharding comes from the shipped accelerate FSDP config (not train.fsdp)."""
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate launcher not installed")
    out = tmp_path / "run"
    cfg = {
        "student": str(tiny_model_dir),
        "teacher": str(tiny_model_dir_same_tokenizer),
        "task": {"n_train": 32, "n_test": 4},
        "rollout": {"max_new_tokens": 5},
        "selection": {"strategy": "teachability", "ratio": 0.3},
        "optim": {"lr": 3e-3},
        "train": {
            "steps": 3,
            "batch_size": 4,
            "save_every": 1,
            "keep_last": 3,
            "tensorboard": False,
            "eval_teacher": False,
            "eval_before": False,
        },
        "eval": {"max_new_tokens": 3, "heldout_kl_prompts": 0},
        "output_dir": str(out),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    fsdp_config = ROOT / "src" / "taopd" / "configs" / "accelerate" / "fsdp.yaml"
    launch(path, 2, config_file=fsdp_config)
    assert json.loads((out / "summary.json").read_text())["fsdp"] is True
    ckpts = out / "checkpoints"
    first = weights(ckpts / "step-000003" / "model")
    shutil.rmtree(ckpts / "step-000003")
    (out / "summary.json").unlink()
    launch(path, 2, extra=["--resume"], config_file=fsdp_config)
    again = weights(ckpts / "step-000003" / "model")
    assert set(first) == set(again)
    for k in first:
        assert torch.allclose(first[k], again[k], atol=1e-6), k
    assert not torch.allclose(first[k], weights(ckpts / "step-000002" / "model")[k])


def test_sharding_refusals(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, monkeypatch):
    """DeepSpeed and FSDP on one process (by config or by launcher) stop with a message."""
    from taopd.errors import UserError
    from taopd.train import Trainer
    from tests.test_train import tiny_cfg

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="DeepSpeed is not supported.*FSDP"):
        Trainer(cfg)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    with pytest.raises(UserError, match="launch 2 or more"):
        Trainer(tiny_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, "train.fsdp=true"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="launch 2 or more"):
        Trainer(cfg)
    assert not out.exists()

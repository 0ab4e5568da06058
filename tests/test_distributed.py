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


@pytest.mark.parametrize("strategy", ["full", "teachability"])
def test_two_processes_equal_one(strategy, tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path):
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
            "save_every": 3,
            "tensorboard": False,
            "eval_teacher": False,
            "eval_before": False,
        },
        "eval": {"max_new_tokens": 3, "heldout_kl_prompts": 0},
    }
    finals = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        path = tmp_path / f"p{procs}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
        launcher = str(Path(sys.executable).parent / "accelerate")
        # accelerate's --cpu launcher needs MPI for several processes; its multi-GPU launcher
        # (torchrun) runs CPU processes with gloo, and taopd uses the CPU when no GPU is present
        layout = ["--multi_gpu"] if procs > 1 else ["--cpu"]
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
        ]
        run(cmd, ROOT)
        finals[procs] = weights(out / "checkpoints" / "step-000003" / "model")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == procs
    start = weights(tiny_model_dir)
    moved = False
    for k in finals[1]:
        assert torch.allclose(finals[1][k], finals[2][k], atol=2e-5), k
        moved |= not torch.allclose(finals[1][k], start[k])
    assert moved  # training changed the weights, identically in both layouts

"""Two CPU processes (accelerate launch, gloo) must train exactly like one with the same batch.

Layouts: replicated (gradient all-reduce), FSDP2 and DeepSpeed ZeRO-3 (when deepspeed is
installed, as `make` does)."""

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
ACCELERATE_CONFIGS = ROOT / "src" / "taopd" / "configs" / "accelerate"


def has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


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


def run_layouts(cfg: dict, tmp_path: Path) -> tuple[dict, dict, list[str]]:
    """Run `cfg` on 1 process, then on 2: replicated, FSDP2 and (when installed) ZeRO-3.

    Returns the final weights and the summary of each layout, and the 2-process names."""
    layouts = [("one", 1, {}), ("ddp", 2, {}), ("fsdp", 2, {"fsdp": True})]
    if has_deepspeed():
        layouts.append(("zero3", 2, {"deepspeed": True}))
    finals, summaries = {}, {}
    for name, procs, sharding in layouts:
        out = tmp_path / name
        path = tmp_path / f"{name}.yaml"
        train = {**cfg["train"], **sharding}
        path.write_text(yaml.safe_dump({**cfg, "train": train, "output_dir": str(out)}))
        launch(path, procs)
        finals[name] = weights(out / "checkpoints" / "step-000003" / "model")
        summaries[name] = json.loads((out / "summary.json").read_text())
        assert summaries[name]["world_size"] == procs
        assert summaries[name]["fsdp"] == (name == "fsdp")
        assert summaries[name]["deepspeed"] == (name == "zero3")
    return finals, summaries, [name for name, _, _ in layouts[1:]]


@pytest.mark.parametrize("strategy", ["full", "teachability"])
def test_two_processes_equal_one(strategy, tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path):
    """Replicated, FSDP2 and ZeRO-3 2-process runs equal 1 process (micro-batches of 2)."""
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate launcher not installed")
    cfg = {
        "student": str(tiny_model_dir),
        "teacher": str(tiny_model_dir_same_tokenizer),
        "task": {"n_train": 32, "n_test": 4},
        "rollout": {"max_new_tokens": 5, "greedy": True},
        "selection": {"strategy": strategy, "ratio": 0.3},
        "optim": {"lr": 3e-3, "scheduler": "cosine", "warmup_steps": 1, "weight_decay": 0.01},
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
    finals, summaries, sharded = run_layouts(cfg, tmp_path)
    start = weights(tiny_model_dir)
    moved = False
    for name in sharded:
        for k in start:
            assert torch.allclose(finals["one"][k], finals[name][k], atol=2e-5), (name, k)
            moved |= not torch.allclose(finals["one"][k], start[k])
        for key in ("student_accuracy_after", "heldout_kl", "tokens_trained"):
            assert summaries[name][key] == pytest.approx(summaries["one"][key], rel=1e-4), key
    assert moved  # training changed the weights, identically in all three layouts


def test_ranks_with_uneven_micro_batches(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path):
    """Prompts skipped for length leave the ranks different row counts (here 3 and 1 rows, i.e.
    2 and 1 micro-batches, at step 1): every layout still agrees with one process (a rank
    with fewer micro-batches runs zero-loss passes so the collectives stay aligned). One test
    problem and one held-out rollout leave rank 1 nothing to evaluate: results still agree."""
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate launcher not installed")
    cfg = {
        "student": str(tiny_model_dir),
        "teacher": str(tiny_model_dir_same_tokenizer),
        "task": {"n_train": 32, "n_test": 1},
        # prompt lengths of the 3 global batches: [57, 44, 47, 40 | 38, 50, 57, 50],
        # [50, 57, 47, 38 | 44, 47, 52, 44], [40, 52, 41, 44 | 41, 56, 44, 62]
        "rollout": {
            "max_new_tokens": 5,
            "greedy": True,
            "max_prompt_tokens": 49,
            "prompt_overflow": "skip",
        },
        "selection": {"strategy": "teachability", "ratio": 0.3},
        "optim": {"lr": 3e-3, "scheduler": "cosine", "warmup_steps": 1, "weight_decay": 0.01},
        "train": {
            "steps": 3,
            "batch_size": 8,
            "micro_batch_size": 2,
            "tensorboard": False,
            "eval_teacher": False,
            "samples_every": 1,
        },
        "eval": {"max_new_tokens": 3, "heldout_kl_prompts": 1},
    }
    finals, summaries, sharded = run_layouts(cfg, tmp_path)
    for name in summaries:
        assert summaries[name]["skipped_prompts"] == 10, name  # the prompts over 49 tokens
    for name in sharded:
        for k in finals["one"]:
            assert torch.allclose(finals["one"][k], finals[name][k], atol=2e-5), (name, k)
        assert summaries[name]["tokens_trained"] == summaries["one"]["tokens_trained"]
        for key in ("student_accuracy_before", "student_accuracy_after", "heldout_kl"):
            assert summaries[name][key] == pytest.approx(summaries["one"][key], rel=1e-4), key


def run_then_resume(
    layout: str, student: Path, teacher: Path, tmp_path: Path, greedy: bool, resume_procs: int
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 3-step 2-process run from the shipped `layout` accelerate config; then its step-3
    checkpoint is removed and the run resumed from step 2 on `resume_procs` processes, which must
    end where the uninterrupted run did. Returns the run's config file and its step-3 weights."""
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate launcher not installed")
    if layout == "deepspeed" and not has_deepspeed():
        pytest.skip("deepspeed not installed")
    out = tmp_path / "run"
    cfg = {
        "student": str(student),
        "teacher": str(teacher),
        "task": {"n_train": 32, "n_test": 4},
        "rollout": {"max_new_tokens": 5, "greedy": greedy},
        "selection": {"strategy": "teachability", "ratio": 0.3},
        "optim": {"lr": 3e-3, "scheduler": "cosine", "warmup_steps": 1, "weight_decay": 0.01},
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
    config = ACCELERATE_CONFIGS / f"{layout}.yaml"
    launch(path, 2, config_file=config)
    assert json.loads((out / "summary.json").read_text())[layout] is True
    ckpts = out / "checkpoints"
    first = weights(ckpts / "step-000003" / "model")
    shutil.rmtree(ckpts / "step-000003")
    (out / "summary.json").unlink()
    launch(path, resume_procs, extra=["--resume"], config_file=config)
    assert json.loads((out / "summary.json").read_text())["world_size"] == resume_procs
    again = weights(ckpts / "step-000003" / "model")
    assert set(first) == set(again)
    for k in first:
        assert torch.allclose(first[k], again[k], atol=1e-6), k
    assert not torch.allclose(first[k], weights(ckpts / "step-000002" / "model")[k])
    return path, first


@pytest.mark.parametrize("layout", ["fsdp", "deepspeed"])
def test_sharded_resume_equals_uninterrupted(
    layout, tiny_model_dir_tied, tiny_model_dir_same_tokenizer, tmp_path
):
    """A sharded run resumed from its step-2 checkpoint ends where the uninterrupted one did.

    Sharding comes from the shipped accelerate config (fsdp.yaml, deepspeed.yaml: ZeRO-3), on a
    student with tied embeddings (like SmolLM2), sampled rollouts (the RNG state resumes).
    Resuming with the other layout is refused."""
    path, first = run_then_resume(
        layout, tiny_model_dir_tied, tiny_model_dir_same_tokenizer, tmp_path, False, 2
    )
    other = ACCELERATE_CONFIGS / ("cpu2.yaml" if layout == "deepspeed" else "deepspeed.yaml")
    if layout == "fsdp" and not has_deepspeed():
        return
    # a finished run's --resume ends before any checkpoint loads ("already finished"): make it
    # unfinished so the resume reaches the checkpoint, whose layout must match
    (tmp_path / "run" / "summary.json").unlink()
    with pytest.raises(AssertionError, match="resume it the same way"):
        launch(path, 2, extra=["--resume"], config_file=other)
    again = weights(tmp_path / "run" / "checkpoints" / "step-000003" / "model")
    assert all(torch.equal(first[k], again[k]) for k in first)  # the refused resume changed nothing


@pytest.mark.parametrize("layout", ["fsdp", "deepspeed"])
def test_sharded_checkpoint_resumes_on_more_processes(
    layout, tiny_model_dir_tied, tiny_model_dir_same_tokenizer, tmp_path
):
    """Checkpoints hold whole states: a 2-process step-2 checkpoint resumed on 4 processes ends
    where the 2-process run did (greedy rollouts, so the split of the batch does not matter)."""
    run_then_resume(layout, tiny_model_dir_tied, tiny_model_dir_same_tokenizer, tmp_path, True, 4)


def test_sharding_refusals(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, monkeypatch):
    """FSDP or DeepSpeed on one process (by config or by launcher), both at once, or with LoRA
    stop with a message before the output folder is made."""
    from taopd.errors import UserError
    from taopd.training.train import Trainer
    from tests.test_train import tiny_cfg

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out)
    for name in ("fsdp", "deepspeed"):
        with pytest.raises(UserError, match=f"train.{name} shards.*launch 2 or more"):
            Trainer(
                tiny_cfg(tiny_model_dir, tiny_model_dir_same_tokenizer, out, f"train.{name}=true")
            )
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.setenv(var, "true")
        with pytest.raises(UserError, match="launch 2 or more"):
            Trainer(cfg)
        monkeypatch.delenv(var)
    assert not out.exists()


def test_deepspeed_config_from_accelerate(tmp_path):
    """accelerate's DeepSpeed settings (variables or a JSON file) become the engine's config;
    batch sizes, clipping and precision come from the taopd config."""
    from taopd.errors import UserError
    from taopd.training.engines.zero import deepspeed_config

    env = {
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    }
    c = deepspeed_config(4, 1.0, "bfloat16", env)
    assert c["zero_optimization"]["stage"] == 2
    assert c["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert "offload_param" not in c["zero_optimization"]
    assert c["train_batch_size"] == 4 and c["gradient_accumulation_steps"] == 1
    assert c["gradient_clipping"] == 1.0 and c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert deepspeed_config(2, 0.0, "float32", {})["zero_optimization"]["stage"] == 3
    file = tmp_path / "ds.json"
    file.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "gradient_accumulation_steps": 8,
                "zero_optimization": {
                    "stage": 3,
                    "reduce_bucket_size": "auto",
                    "sub_group_size": 7,
                },
                "wall_clock_breakdown": True,
            }
        )
    )
    c = deepspeed_config(2, 0.5, "float32", {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(file)})
    assert c["zero_optimization"]["sub_group_size"] == 7
    assert "reduce_bucket_size" not in c["zero_optimization"]  # "auto": DeepSpeed's default
    assert c["gradient_accumulation_steps"] == 1 and c["train_batch_size"] == 2
    assert c["wall_clock_breakdown"] is True and c["gradient_clipping"] == 0.5
    with pytest.raises(UserError, match="stage 1.*stages 2 and 3"):
        deepspeed_config(2, 1.0, "float32", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})
    with pytest.raises(UserError, match="deepspeed_config_file"):
        deepspeed_config(2, 1.0, "float32", {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path)})


def test_deepspeed_missing_says_how_to_install(monkeypatch):
    from taopd.errors import UserError
    from taopd.training.engines import zero

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install --no-build-isolation 'taopd\[deepspeed\]'"):
        zero._deepspeed()

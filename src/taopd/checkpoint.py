"""Atomic checkpoints: write into a temp folder, fsync, rename; never pick up a half-written one."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "save_checkpoint",
    "latest_checkpoint",
    "load_trainer_state",
    "rng_state",
    "set_rng_state",
    "atomic_write_text",
    "load_student_weights",
    "apply_optim_config",
]

PREFIX = "step-"
DONE = "COMPLETE"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temp file + rename, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    save_model: Any,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Save `ckpt_root/step-NNNNNN/` = model/ (via `save_model(dir)`) + trainer_state.pt.

    Written to a hidden temp folder first and renamed when complete; then all but the newest
    `keep_last` complete checkpoints are removed.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:06d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(tmp / "model")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / DONE).write_text(str(step))
    _fsync_tree(tmp)
    if final.exists():  # a checkpoint of the same step (e.g. saved on exit after a step save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _complete(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-*"):  # leftovers of killed writers
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _complete(ckpt_root: Path) -> list[Path]:
    found = [
        p
        for p in ckpt_root.glob(f"{PREFIX}*")
        if p.is_dir() and (p / DONE).exists() and (p / "trainer_state.pt").exists()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    if not ckpt_root.exists():
        return None
    done = _complete(ckpt_root)
    return done[-1] if done else None


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)


LOCK_NAME = ".taopd.lock"


def lock_run_folder(folder: Path) -> Any:
    """Hold an exclusive lock on a run folder for this process's lifetime; return its file.

    A second trainer on the same folder (a relaunched arm while the old one still saves, a
    double start) would interleave logs and checkpoints; it gets None here instead. Where the
    platform has no fcntl (Windows) the lock is skipped and the open file is returned.
    """
    f = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the process lifetime
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def lock_holder(folder: Path) -> str:
    """The pid written by the process that holds the folder's lock ('?' if unknown)."""
    try:
        return (folder / LOCK_NAME).read_text().strip() or "?"
    except OSError:
        return "?"


def clear_folder(folder: Path) -> None:
    """Delete everything in `folder` except its lock file (which this process holds)."""
    for child in folder.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def load_student_weights(model: torch.nn.Module, ckpt: Path, lora: bool = False) -> None:
    """A checkpoint's student weights (model/*.safetensors) into a whole, not yet sharded model.

    With `lora` the files hold the adapter only. Tied lm_heads are not saved, so a missing
    lm_head is expected; anything else missing or unexpected is an error.
    """
    from safetensors.torch import load_file

    from .errors import UserError

    weights = {}
    for f in sorted((ckpt / "model").glob("*.safetensors")):
        weights.update(load_file(f))
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if "lm_head" not in m]  # tied heads are not saved
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt} does not match the student: {missing[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def apply_optim_config(opt: torch.optim.Optimizer, sched: Any, o: Any) -> None:
    """After a resume, use this config's optimizer settings `o` (config.Optim, e.g. a lowered
    lr) in `opt` and its LambdaLR `sched`.

    The optimizer's saved state brings back the old lr, betas and weight decay; unchanged
    values give exactly the lr the uninterrupted run would have had.
    """
    groups = opt.param_groups
    for g in groups:
        g.update(weight_decay=o.weight_decay, betas=tuple(o.betas), initial_lr=o.lr)
    sched.base_lrs = [o.lr] * len(groups)
    for g, factor in zip(groups, sched.lr_lambdas):
        g["lr"] = o.lr * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in groups]

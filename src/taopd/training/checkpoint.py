"""Atomic checkpoints: write into a temp folder, fsync, rename; never pick up a half-written one.

Everything here is stored as tensors and plain data (ints, floats, strings, lists, dicts) and
read back with `torch.load(weights_only=True)`: a crafted file cannot run code.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..models import safetensors_problem

__all__ = [
    "save_checkpoint",
    "latest_checkpoint",
    "load_trainer_state",
    "rng_state",
    "set_rng_state",
    "atomic_write_text",
    "disk_full",
    "load_student_weights",
    "apply_optim_config",
    "load_plain",
    "resume_checkpoint",
    "safetensors_problem",
]

PREFIX = "step-"
OLD = ".old-"  # a replaced checkpoint of the same step, until its successor is in place
DONE = "COMPLETE"


def disk_full(e: BaseException) -> bool:
    """Whether an error is the disk (or the quota) running out of space."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _out_of_space(e: BaseException, where: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC in the error or its cause, or a writer
    that hides the errno (torch.save's "file write failed", safetensors' StorageFull) on a
    nearly full disk."""
    if disk_full(e) or disk_full(e.__cause__ or e.__context__ or e):
        return True
    hints = ("No space left", "StorageFull", "write failed", "os error 28")
    return any(h in str(e) for h in hints) and shutil.disk_usage(where).free < 64 << 20


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temp file + rename, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and numbers."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": torch.tensor(mt, dtype=torch.int64),
        "python_version": int(version),
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "numpy_pos": int(pos),
        "numpy_gauss": [int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    mt = tuple(int(x) for x in state["python"].tolist())
    random.setstate((state["python_version"], mt, state["python_gauss"]))
    keys = state["numpy"].numpy().astype(np.uint32)
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy_pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_plain(path: Path, what: str = "file") -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain data only, never code.

    Any failure is a UserError of one line naming the file (a pickle that asks for other
    objects is refused before anything in it runs).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # garbage bytes rather than a pickle asking for objects
            raise UserError(f"{what} {path} cannot be read (not a file written by taopd)") from None
        raise UserError(
            f"{what} {path} holds more than tensors and plain data (not written by this taopd); "
            "refused to load it (nothing in it was run): delete it or restore a good copy"
        ) from None
    except Exception as e:  # noqa: BLE001 - a corrupt file of any kind: one line, not a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{what} {path} cannot be read ({first})") from None


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
    try:
        tmp.mkdir()
        save_model(tmp / "model")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / DONE).write_text(str(step))
        _fsync_tree(tmp)
    except Exception as e:  # torch.save and safetensors wrap the OSError in their own errors
        if not _out_of_space(e, ckpt_root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written one goes, the space it took too
        previous = _complete(ckpt_root)
        kept = f"the last checkpoint {previous[-1]} is intact" if previous else "none was saved"
        raise UserError(
            f"disk full writing checkpoint {final.name} in {ckpt_root}: {kept}; free space, "
            "then continue with --resume"
        ) from None
    replaced = None
    if final.exists():  # a checkpoint of the same step (e.g. saved on exit after a step save):
        # moved aside first and deleted only once the new one is in place, so a kill between
        # the two renames still leaves a complete checkpoint (found under its .old- name)
        replaced = ckpt_root / f"{OLD}{final.name}-{os.getpid()}"
        os.replace(final, replaced)
    os.replace(tmp, final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    for old in _complete(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-*"):  # leftovers of killed writers
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    for stale in ckpt_root.glob(f"{OLD}*"):  # moved aside by a writer killed mid-replace
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _step_of(p: Path) -> int | None:
    digits = p.name.removeprefix(OLD).removeprefix(PREFIX).split("-")[0]
    return int(digits) if digits.isdigit() else None


def _complete(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a moved-aside `.old-` one only if its step has none)."""
    by_step: dict[int, Path] = {}
    for p in [*ckpt_root.glob(f"{PREFIX}*"), *ckpt_root.glob(f"{OLD}{PREFIX}*")]:
        step = _step_of(p)
        if step is None or not (p / DONE).exists() or not (p / "trainer_state.pt").exists():
            continue
        if step not in by_step or not p.name.startswith(OLD):
            by_step[step] = p
    return [by_step[k] for k in sorted(by_step)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    if not ckpt_root.exists():
        return None
    done = _complete(ckpt_root)
    return done[-1] if done else None


_LOADED: dict[Path, dict[str, Any]] = {}  # states read by resume_checkpoint, handed to the load


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (tensors and plain data only, see `load_plain`)."""
    state = _LOADED.pop(ckpt, None)
    if state is None:
        state = load_plain(ckpt / "trainer_state.pt", "checkpoint file")
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"checkpoint file {ckpt / 'trainer_state.pt'} holds no trainer state")
    return state


def _checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (None when its state and weights load)."""
    files = sorted((ckpt / "model").glob("*.safetensors"))
    if not files:
        return f"{ckpt / 'model'} holds no *.safetensors weights"
    for f in files:
        problem = safetensors_problem(f)
        if problem:
            return f"{f}: {problem}"
    try:
        _LOADED[ckpt] = load_trainer_state(ckpt)
    except UserError as e:
        return str(e)
    return None


def resume_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint that loads; says so when newer ones were skipped.

    None when there is no complete checkpoint at all; a UserError naming the newest one's bad
    file when checkpoints exist but none loads.
    """
    done = _complete(ckpt_root) if ckpt_root.exists() else []
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(done):
        problem = _checkpoint_problem(ckpt)
        if problem is None:
            if skipped and os.environ.get("RANK", "0") == "0":
                bad, why = skipped[0]
                print(
                    f"taopd: checkpoint {bad} cannot be loaded ({why}); resuming from "
                    f"{ckpt.name}, the newest one that can",
                    file=sys.stderr,
                    flush=True,
                )
            return ckpt
        skipped.append((ckpt, problem))
    if skipped:
        bad, why = skipped[0]
        raise UserError(f"no checkpoint in {ckpt_root} can be loaded; the newest: {why}")
    return None


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


def load_student_weights(model: torch.nn.Module, ckpt: Path, lora: bool = False) -> None:
    """A checkpoint's student weights (model/*.safetensors) into a whole, not yet sharded model.

    With `lora` the files hold the adapter only. Tied lm_heads are not saved, so a missing
    lm_head is expected; anything else missing or unexpected is an error.
    """
    from safetensors.torch import load_file

    weights = {}
    for f in sorted((ckpt / "model").glob("*.safetensors")):
        weights.update(load_file(f))
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
        return
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shapes differ
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"checkpoint {ckpt} does not match the student: {first}") from None
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


def check_checkpoint_student(ckpt: Path, model: Any) -> None:
    """Refuse a checkpoint whose saved weights (names, shapes) are not this student's.

    Reads only the safetensors headers, so a resume with another student stops before the run
    folder is touched."""
    from safetensors import safe_open

    saved: dict[str, tuple[int, ...]] = {}
    for f in sorted((ckpt / "model").glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                saved[k] = tuple(sf.get_slice(k).get_shape())
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in saved and "lm_head" not in k]  # tied heads: not saved
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k} {saved[k]} vs {own[k]}" for k in saved if k in own and saved[k] != own[k]]
    if missing or unexpected or shapes:
        what = shapes[:2] or [f"missing {k}" for k in missing[:2]] or unexpected[:2]
        raise UserError(
            f"checkpoint {ckpt} does not match the student ({'; '.join(what)}): resume with "
            "the student the run was started with"
        )


def save_rollout(path: Path, roll: Any, **extra: Any) -> None:
    """Write a Rollout (and plain `extra` entries) as tensors + plain data, atomically."""
    roll = roll.to("cpu")
    data = {
        "input_ids": roll.input_ids,
        "attention_mask": roll.attention_mask,
        "response_mask": roll.response_mask,
        "prompt_len": int(roll.prompt_len),
        "texts": list(roll.texts),
        **extra,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(data, tmp)
    os.replace(tmp, path)


def load_rollout(path: Path, what: str = "rollout bank") -> tuple[Any, dict[str, Any]]:
    """(Rollout, the whole plain dict) of a file written by `save_rollout`; never runs code."""
    from .rollout import Rollout

    data = load_plain(path, what)
    try:
        roll = Rollout(
            data["input_ids"],
            data["attention_mask"],
            data["response_mask"],
            int(data["prompt_len"]),
            [str(t) for t in data["texts"]],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{what} {path} is not a rollout bank written by taopd ({e!r})") from None
    return roll, data

"""The run folder: taopd's marker file, the checks made before anything is written, claiming it.

A folder is only ever cleared (`--overwrite`) when it holds the marker `taopd-run.json`, written
when taopd creates a run; every check that can fail runs before the folder is created or locked.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .checkpoint import (
    LOCK_NAME,
    atomic_write_text,
    clear_folder,
    lock_holder,
    lock_run_folder,
    resume_checkpoint,
)
from .errors import UserError

__all__ = [
    "MARKER",
    "check_output",
    "check_diagnose_output",
    "check_report_folder",
    "claim",
    "marker_kind",
    "write_marker",
]

MARKER = "taopd-run.json"
_OURS = {LOCK_NAME, ".write-test"}  # what a run folder holds before its marker is written


def write_marker(folder: Path, kind: str) -> None:
    """Mark `folder` as a taopd run of `kind` ('train', 'diagnose', 'compare')."""
    from . import __version__

    if marker_kind(folder) == kind:
        return
    info = {"taopd": __version__, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(folder / MARKER, json.dumps(info) + "\n")


def marker_kind(folder: Path) -> str | None:
    """The kind recorded in `folder`'s marker ('train', ...), '?' if unreadable, None if none."""
    path = folder / MARKER
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text()).get("kind", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


def _listing(folder: Path, n: int = 5) -> str:
    """'a/, b.txt, c.yaml and 4 more': what a folder holds, for a refusal message."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    names = [x for x in names if x not in _OURS]
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _foreign(folder: Path) -> bool:
    """True if `folder` holds files but no taopd marker."""
    if not folder.is_dir() or marker_kind(folder) is not None:
        return False
    return any(p.name not in _OURS for p in folder.iterdir())


def _check_writable(out: Path) -> None:
    """Refuse an output_dir that cannot be created or written, without creating anything."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a folder")
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write to output_dir {out}: Not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to output_dir {out}: Permission denied")


def _check_not_busy(out: Path) -> None:
    """Refuse a folder whose lock another process holds (probing it changes nothing)."""
    path = out / LOCK_NAME
    if not path.is_file():
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return
    with open(path) as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"output_dir {out} is in use by another taopd process (pid "
                f"{lock_holder(out)}); wait for it to finish or stop it, then rerun"
            ) from None
        except OSError:
            return


def check_output(out: Path, resume: bool, overwrite: bool) -> tuple[Path | None, bool]:
    """Every check of a training run's output_dir, writing nothing: (checkpoint, holds a run).

    The checkpoint is the one `--resume` continues from (None for a fresh start).
    """
    _check_writable(out)
    if resume and overwrite:
        raise UserError(
            "--resume and --overwrite contradict each other: --resume continues the run in "
            "output_dir, --overwrite deletes it; pass one"
        )
    has_run = (out / "config.yaml").exists() or (out / "checkpoints").exists()
    if (overwrite or (has_run and not resume)) and _foreign(out):
        raise UserError(
            f"output_dir {out} was not created by taopd (no {MARKER}) and holds "
            f"{_listing(out)}; refusing to {'delete' if overwrite else 'write into'} it: "
            "choose another output_dir"
        )
    if has_run and not (resume or overwrite):
        raise UserError(
            f"output_dir {out} already holds a run; pass --resume to continue it or "
            "--overwrite to replace it (or choose another output_dir)"
        )
    kind = marker_kind(out)
    if kind not in (None, "train"):
        raise UserError(
            f"output_dir {out} holds a taopd {kind} run, not a training run; choose another "
            "output_dir"
        )
    _check_not_busy(out)
    ckpt = resume_checkpoint(out / "checkpoints") if resume else None
    if resume and ckpt is None:
        raise UserError(
            f"--resume: output_dir {out} holds no checkpoint to resume from; run without "
            "--resume to start (add --overwrite to replace what is there)"
        )
    return ckpt, has_run


def claim(out: Path, kind: str, replace: bool, files: dict[str, str]) -> Any:
    """Create and lock `out`; clear it if `replace` (only a marked run); write the marker and
    `files` (name -> text). Returns the open lock file (held for the process lifetime)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output_dir {out}: {e.strerror}") from None
    lock = lock_run_folder(out)
    if lock is None:
        raise UserError(
            f"output_dir {out} is in use by another taopd process (pid "
            f"{lock_holder(out)}); wait for it to finish or stop it, then rerun"
        )
    if replace:
        if _foreign(out):  # checked before; kept here so no path can delete foreign files
            lock.close()
            raise UserError(f"--overwrite: {out} holds no {MARKER}; refusing to delete it")
        clear_folder(out)  # keeps the lock this process holds
    write_marker(out, kind)
    for name, text in files.items():
        (out / name).write_text(text)
    return lock


def check_diagnose_output(out: Path, overwrite: bool) -> None:
    """`taopd diagnose` writes only into an empty folder, its own earlier one, or a new one."""
    _check_writable(out)
    if not out.is_dir():
        return
    kind = marker_kind(out)
    trained = any((out / n).exists() for n in ("checkpoints", "metrics.jsonl", "summary.json"))
    if kind == "train" or (kind is None and trained):
        raise UserError(
            f"output_dir {out} holds a training run; give taopd diagnose its own --output-dir"
        )
    if kind not in (None, "diagnose"):
        raise UserError(
            f"output_dir {out} holds a taopd {kind} run; give taopd diagnose its own --output-dir"
        )
    if (out / "positions.csv").exists() and not overwrite:
        raise UserError(
            f"{out} already holds a diagnostic; pass --overwrite or another --output-dir"
        )
    if kind is None and not (out / "positions.csv").exists() and _foreign(out):
        raise UserError(
            f"output_dir {out} was not created by taopd (no {MARKER}) and holds "
            f"{_listing(out)}; give taopd diagnose an empty or new --output-dir"
        )


_RUN_FILES = ("summary.json", "metrics.jsonl", "samples.jsonl", "positions.csv", "results.csv")


def check_report_folder(run_dir: Path) -> None:
    """`taopd report` writes report.html only into a taopd run, diagnostic or comparison."""
    if not run_dir.is_dir():
        raise UserError(f"report: run folder {run_dir} does not exist or is not a folder")
    if marker_kind(run_dir) is None and not any((run_dir / n).is_file() for n in _RUN_FILES):
        raise UserError(
            f"report: {run_dir} is not a taopd run folder (no {MARKER}, summary.json or "
            "metrics.jsonl); nothing written"
        )


def out_of_memory(err: BaseException, step: int, out: Path) -> str | None:
    """The one-line message for a step that ran out of memory (None: `err` is something else)."""
    from .checkpoint import latest_checkpoint

    text = str(err).lower()
    if not (
        type(err).__name__ == "OutOfMemoryError"
        or "out of memory" in text
        or "can't allocate memory" in text
    ):
        return None
    ckpt = latest_checkpoint(out / "checkpoints")
    kept = f"the last checkpoint, {ckpt}, is kept" if ckpt else "no checkpoint was saved yet"
    return (
        f"out of memory in step {step}; {kept}: lower train.micro_batch_size (or "
        "train.batch_size, rollout.max_new_tokens, selection.chunk_size), then --resume"
    )

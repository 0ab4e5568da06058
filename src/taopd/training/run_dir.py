"""The run folder: taopd's marker file, the checks made before anything is written, claiming it,
and (`RunFolder`) a training run's view of it: its logs, cut back to a checkpoint on resume.

The folder rules: taopd writes its marker `taopd-run.json` only into a folder that is new or
empty (or already marked); a non-empty folder without it is refused, whatever the flags. On
`--overwrite` it removes only what a run writes (`RUN_OUTPUTS`), in a marked folder; anything
else there (a user's notes) is kept and named. Every check that can fail runs before the folder
is created or locked. Layout of a training run: `RUN_OUTPUTS`, and .taopd.lock (held by the
trainer using the folder).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from .checkpoint import (
    LOCK_NAME,
    atomic_write_text,
    disk_full,
    latest_checkpoint,
    lock_holder,
    lock_run_folder,
    resume_checkpoint,
)
from .collectives import Group

__all__ = [
    "LOGS",
    "MARKER",
    "RUN_OUTPUTS",
    "RunFolder",
    "check_output",
    "check_diagnose_output",
    "check_report_folder",
    "claim",
    "lost_peer",
    "marker_kind",
    "out_of_memory",
    "refuse_foreign",
    "remove_run",
    "write_marker",
]

MARKER = "taopd-run.json"
LOGS = ("metrics.jsonl", "samples.jsonl")  # one JSON record per line, each with its "step"
_OURS = {LOCK_NAME, ".write-test"}  # what a run folder holds before its marker is written
RUN_OUTPUTS = (
    MARKER, "config.yaml", *LOGS, "heldout_bank.pt", "checkpoints", "summary.json",
    "tb", "wandb", "trackers.json", "report.html", "model", "student",
)  # fmt: skip
"""What a training run writes at the top of its folder, all that `--overwrite` removes: the
marker, config, logs, the held-out bank, checkpoints/step-NNNNNN/, summary.json, tb/
(tensorboard), wandb/ (unless WANDB_DIR is set), trackers.json (the tracker run ids a resume
reopens), report.html (`taopd report`), model/ (a compare arm's final weights) and student/
(`taopd diagnose`'s updated student, in its update/ folder)."""


def write_marker(folder: Path, kind: str) -> None:
    """Mark `folder` as a taopd run of `kind` ('train', 'diagnose', 'compare')."""
    from .. import __version__

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


def refuse_foreign(out: Path, verb: str, but: tuple[str, ...] = ()) -> None:
    """The folder rule: refuse to `verb` ('write into', 'delete') a non-empty folder that taopd
    did not create (no marker); entries named in `but` do not count."""
    if not out.is_dir() or marker_kind(out) is not None:
        return
    if any(p.name not in _OURS and p.name not in but for p in out.iterdir()):
        raise UserError(
            f"output_dir {out} was not created by taopd (no {MARKER}) and holds "
            f"{_listing(out)}; refusing to {verb} it: choose another output_dir (a new or "
            "empty one)"
        )


def _ours(name: str) -> bool:
    """Whether a top-level entry of a run folder is a run's output (or its temp file)."""
    if name.startswith(".") and ".tmp-" in name:  # atomic_write_text's `.NAME.tmp-PID`
        name = name[1:].split(".tmp-")[0]
    return name in RUN_OUTPUTS or name == ".write-test"


def remove_run(folder: Path) -> list[str]:
    """`--overwrite`: delete what a run wrote in the marked `folder` (`RUN_OUTPUTS`; in
    checkpoints/ only the step folders) and nothing else; return the names of what is kept."""
    kept = []
    for child in sorted(folder.iterdir()):
        if child.name == LOCK_NAME:  # held by this process
            continue
        if not _ours(child.name):
            kept.append(child.name + ("/" if child.is_dir() else ""))
        elif child.name == "checkpoints" and child.is_dir() and not child.is_symlink():
            for step in child.iterdir():
                if not step.name.lstrip(".").startswith(("step-", "tmp-step-", "old-step-")):
                    kept.append(f"checkpoints/{step.name}")
                elif step.is_dir() and not step.is_symlink():
                    shutil.rmtree(step)
                else:
                    step.unlink()
            if not any(child.iterdir()):
                child.rmdir()
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return kept


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


def check_output(
    out: Path, resume: bool, overwrite: bool, probe_lock: bool = True
) -> tuple[Path | None, bool]:
    """Every check of a training run's output_dir, writing nothing: (checkpoint, holds a run).

    The checkpoint is the one `--resume` continues from (None for a fresh start).
    """
    _check_writable(out)
    if resume and overwrite:
        raise UserError(
            "--resume and --overwrite contradict each other: --resume continues the run in "
            "output_dir, --overwrite deletes it; pass one"
        )
    refuse_foreign(out, "delete" if overwrite else "write into")
    has_run = (out / "config.yaml").exists() or (out / "checkpoints").exists()
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
    if probe_lock:  # the main process only: the others would find its own fresh lock
        _check_not_busy(out)
    ckpt = resume_checkpoint(out / "checkpoints") if resume else None
    if resume and ckpt is None:
        raise UserError(_nothing_to_resume(out, has_run))
    return ckpt, has_run


def _nothing_to_resume(out: Path, has_run: bool) -> str:
    """--resume without a checkpoint: what to run instead (a command that is accepted)."""
    if has_run:  # stopped before its first checkpoint: only --overwrite starts it again
        return (
            f"--resume: the run in {out} has no checkpoint yet (it ended before its first "
            "save); start it again with --overwrite instead of --resume"
        )
    where = "does not exist" if not out.exists() else "holds no run"
    return (
        f"--resume: output_dir {out} {where}, so there is nothing to resume; run the same "
        "command without --resume to start the run"
    )


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
    try:  # checked before; again here, so that no path marks or clears a foreign folder
        refuse_foreign(out, "delete" if replace else "write into")
    except UserError:
        lock.close()
        raise
    kept = remove_run(out) if replace else []
    if kept:
        print(
            f"taopd: --overwrite kept what taopd did not write in {out}: {', '.join(kept[:5])}"
            f"{f' and {len(kept) - 5} more' if len(kept) > 5 else ''}",
            file=sys.stderr,
            flush=True,
        )
    write_marker(out, kind)
    for name, text in files.items():
        atomic_write_text(out / name, text)
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
        "selection.chunk_size, loss.chunk_size), then --resume (a smaller train.batch_size or "
        "rollout.max_new_tokens changes the run: start it again with --overwrite)"
    )


def lost_peer(
    err: BaseException, group: Group, step: int, timeout_s: float, out: Path
) -> str | None:
    """The one-line message for a collective that failed (a process died) or waited past
    train.collective_timeout_s (one hangs) in `step`; None: `err` is something else."""
    import torch

    text = str(err)
    lost = isinstance(err, torch.distributed.DistError) or any(
        w in text for w in ("Connection closed", "Connection reset", "imed out", "gloo")
    )
    if group.world == 1 or not lost:
        return None
    last = latest_checkpoint(out / "checkpoints")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
    return (
        f"process {group.rank} of {group.world}: a collective at step {step} "
        "failed or waited past train.collective_timeout_s="
        f"{timeout_s:g} s (another process died or hangs: "
        f"{first}); last checkpoint: {last or 'none'}, continue with --resume"
    )


class RunFolder:
    """The output folder of one training run, as seen by every process of `group`."""

    def __init__(self, path: Path, group: Group) -> None:
        self.path = path
        self.group = group
        self._lock: Any = None
        self._replace_run = self._fresh_start = False

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def replaces_run(self) -> bool:
        """Whether `commit` clears a run in the folder (--overwrite of one), by `prepare`."""
        return self._replace_run

    def prepare(self, resume: bool, overwrite: bool) -> Path | None:
        """Every check of the folder, writing nothing; return the checkpoint to resume."""
        ckpt, has_run = check_output(self.path, resume, overwrite, self.group.is_main)
        # Creating, locking and clearing the folder (--overwrite) and writing config.yaml wait
        # for `commit`, after every input check: a run that fails one leaves it as it was.
        self._replace_run = overwrite and has_run
        self._fresh_start = ckpt is None
        return ckpt

    def commit(self, config_yaml: str | None) -> None:
        """Claim the folder: create and lock it, remove a run replaced by --overwrite, write the
        taopd marker and config.yaml (None: keep it, for a finished run). A resume that goes on
        drops the summary.json of an earlier finish (it is written again at the end)."""
        self.group.wait()
        if self.group.is_main:
            files = {"config.yaml": config_yaml} if config_yaml is not None else {}
            self._lock = claim(self.path, "train", self._replace_run, files)
            if not self._fresh_start and config_yaml is not None:
                (self.path / "summary.json").unlink(missing_ok=True)
        self.group.wait()

    def truncate_logs(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone).

        A line cut short by a kill is dropped too.
        """
        if not self.group.is_main:
            return
        for path in (self.path / name for name in LOGS):
            if not path.exists():
                continue
            keep = []
            for ln in path.read_text().splitlines():
                try:
                    if json.loads(ln)["step"] <= step:
                        keep.append(ln)
                except (ValueError, KeyError, TypeError):
                    continue
            atomic_write_text(path, "".join(k + "\n" for k in keep))

    def append(self, log: str, records: list[dict[str, Any]]) -> None:
        """Append JSON records to one of the run's logs (main process only)."""
        if not self.group.is_main:
            return
        try:
            with open(self.path / log, "a") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")
        except OSError as e:
            if not disk_full(e):
                raise
            last = latest_checkpoint(self.checkpoints)
            kept = f"the last checkpoint {last} is intact" if last else "no checkpoint yet"
            raise UserError(
                f"disk full appending to {self.path / log}: {kept}; free space, then continue "
                "with --resume (a line cut short is dropped then)"
            ) from None

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.group.is_main:
            atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2))

    def close(self) -> None:
        """Let go of the folder's lock (e.g. for another trainer in this process)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

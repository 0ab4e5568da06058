"""A run folder: checked and locked before heavy work, claimed once the inputs look sound, and
the logs in it (metrics.jsonl, samples.jsonl) cut back to a checkpoint on resume.

Layout: config.yaml, metrics.jsonl, samples.jsonl, heldout_bank.pt, checkpoints/step-NNNNNN/,
summary.json, tb/ (tensorboard), .taopd.lock (held by the trainer using the folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import (
    atomic_write_text,
    clear_folder,
    latest_checkpoint,
    lock_holder,
    lock_run_folder,
)
from .collectives import Group
from .errors import UserError

__all__ = ["LOGS", "RunFolder"]

LOGS = ("metrics.jsonl", "samples.jsonl")  # one JSON record per line, each with its "step"


class RunFolder:
    """The output folder of one training run, as seen by every process of `group`."""

    def __init__(self, path: Path, group: Group) -> None:
        self.path = path
        self.group = group
        self._lock: Any = None
        self._replace_run = self._fresh_start = self._resume_from_scratch = False

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def prepare(self, resume: bool, overwrite: bool) -> Path | None:
        """Check the folder before any heavy work, lock it; return the checkpoint to resume."""
        out = self.path
        has_run = (out / "config.yaml").exists() or self.checkpoints.exists()
        if out.exists() and not out.is_dir():
            raise UserError(f"output_dir {out} exists and is not a folder")
        if has_run and not (resume or overwrite):
            raise UserError(
                f"output_dir {out} already holds a run; pass --resume to continue it or "
                "--overwrite to replace it (or choose another output_dir)"
            )
        self.group.wait()
        if self.group.is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
                probe = out / ".write-test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise UserError(f"cannot write to output_dir {out}: {e.strerror}") from None
            self._lock = lock_run_folder(out)  # held until this process ends
            if self._lock is None:
                raise UserError(
                    f"output_dir {out} is in use by another taopd process (pid "
                    f"{lock_holder(out)}); wait for it to finish or stop it, then rerun"
                )
        self.group.wait()
        ckpt = latest_checkpoint(self.checkpoints) if resume else None
        # Deleting an old run (--overwrite) and writing config.yaml wait for `commit`, after
        # the cheap input checks: a run that fails them leaves the folder as it was.
        self._replace_run = overwrite and has_run and not resume
        self._fresh_start = not (resume and ckpt is not None)
        self._resume_from_scratch = resume and ckpt is None
        return ckpt

    def commit(self, config_yaml: str) -> None:
        """Claim the folder: remove a run replaced by --overwrite, write config.yaml."""
        out = self.path
        if self.group.is_main:
            if self._replace_run:
                clear_folder(out)  # keeps the lock this process holds
            if self._fresh_start:
                (out / "config.yaml").write_text(config_yaml)
            if self._resume_from_scratch:  # logs of a run killed before its first checkpoint
                for stale in LOGS:
                    (out / stale).unlink(missing_ok=True)
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
        with open(self.path / log, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.group.is_main:
            atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2))

    def tensorboard(self) -> Any:
        """A SummaryWriter into tb/ on the main process (None elsewhere, or without
        tensorboard installed: the JSONL logs only)."""
        if not self.group.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.path / "tb"))

    def close(self) -> None:
        """Let go of the folder's lock (e.g. for another trainer in this process)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

"""Experiment trackers (train.report_to) through accelerate's tracker classes, one object per run.

`Trackers.start` is called once at setup: on the main process it starts one tracker run per
configured tracker (none on the other processes), `log` then feeds each the numeric metrics of a
step, `finish` closes them. metrics.jsonl stays the record; trackers get a copy. Where each one
writes: tensorboard into the run folder's tb/; wandb into the run folder's wandb/ (or WANDB_DIR),
online or offline as WANDB_MODE says; trackio into its local database (TRACKIO_DIR, by default
~/.cache/huggingface/trackio) or its Space / server; mlflow to MLFLOW_TRACKING_URI (by default
./mlruns). A resumed run reopens its tracker runs: the ids are kept in `trackers.json`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path
from typing import Any

from ..config import TrainCfg
from ..errors import UserError
from .checkpoint import atomic_write_text

__all__ = ["STATE_FILE", "Trackers", "check_trackers", "numeric"]

STATE_FILE = "trackers.json"  # in the run folder: the tracker run ids a resume reopens

# tracker -> (the module it imports, the pip install that brings it)
_PACKAGES = {
    "tensorboard": ("torch.utils.tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'taopd[wandb]'"),
    "trackio": ("trackio", "pip install 'taopd[trackio]'"),
    "mlflow": ("mlflow", "pip install 'taopd[mlflow]'"),
}


_START_HINTS = {
    "wandb": "; log in (`wandb login`) or log offline with WANDB_MODE=offline",
    "mlflow": "; check MLFLOW_TRACKING_URI",
}


def check_trackers(train: TrainCfg) -> list[str]:
    """The run's trackers (`train.trackers()`), after checking each one's package imports: a
    missing one is one `UserError` line naming the extra to install. Cheap; call before work."""
    names = train.trackers()
    for name in names:
        module, install = _PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            package = module.split(".")[-1]
            raise UserError(
                f"train.report_to includes {name}, but the package {package} is not installed: "
                f"{install} (or drop {name} from train.report_to)"
            ) from None
    return names


def numeric(metrics: dict[str, Any]) -> dict[str, float | int]:
    """The metrics a tracker can plot: numbers (not bools, not None), without the step."""
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
    }


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the config as flat parameters (mlflow takes no nesting)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _tracker(
    kind: str,
    train: TrainCfg,
    folder: Path,
    config: dict[str, Any],
    state: dict[str, Any],
    resume: bool,
) -> Any:
    """The accelerate tracker of `kind` for the run in `folder`, not started yet; records the
    wandb run id it will use in `state` (kept in trackers.json for a resume)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    name = train.run_name or folder.resolve().name
    group, project = train.tracker_group, train.tracker_project
    if kind == "tensorboard":  # <folder>/tb, as before report_to
        return TensorBoardTracker("tb", folder)
    if kind == "wandb":  # a resume reopens the same run id (offline: a new file of that id)
        state.setdefault("wandb_id", _run_id())
        kw: dict[str, Any] = dict(name=name, group=group, config=config, id=state["wandb_id"])
        if not os.environ.get("WANDB_DIR"):
            kw["dir"] = str(folder)
        return WandBTracker(project, resume="allow", **kw)
    if kind == "trackio":  # a resume continues the run of the same name
        mode = "allow" if resume else "never"
        return TrackioTracker(project, name=name, group=group, config=config, resume=mode)
    # mlflow: the experiment is the project, the group a tag; a resume reopens the run id
    tags = {"taopd.group": group} if group else None
    return MLflowTracker(project, run_id=state.get("mlflow_run_id"), tags=tags, run_name=name)


def _run_id() -> str:
    """A new tracker run id: 8 lowercase letters and digits, as wandb makes them."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class Trackers:
    """The tracker runs of one taopd run (accelerate `GeneralTracker`s), main process only."""

    def __init__(self, trackers: list[Any] | None = None) -> None:
        self.trackers = list(trackers or [])

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    @classmethod
    def start(
        cls,
        train: TrainCfg,
        folder: Path,
        config: dict[str, Any] | None = None,
        main: bool = True,
        resume: bool = False,
    ) -> Trackers:
        """Start a tracker run per configured tracker for the run in `folder` (main process
        only; elsewhere an empty set). `resume` reopens the runs recorded in its trackers.json;
        `config` (the run's config) is stored with the runs that keep one (wandb, trackio,
        mlflow)."""
        names = check_trackers(train)
        if not main or not names:
            return cls()
        state_path = folder / STATE_FILE
        state: dict[str, Any] = {}
        if resume and state_path.is_file():
            try:
                state = json.loads(state_path.read_text())
            except ValueError:
                state = {}
        started = cls()
        for kind in names:
            tracker = _tracker(kind, train, folder, config or {}, state, resume)
            try:
                tracker.start()
                if kind == "mlflow":
                    state["mlflow_run_id"] = tracker.active_run.info.run_id
                    if not resume:
                        tracker.store_init_configuration(_flat(config or {}))
            except Exception as e:
                started.finish()
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise UserError(
                    f"train.report_to: {kind} could not start a run ({type(e).__name__}: "
                    f"{first}){_START_HINTS.get(kind, '')}; or drop {kind} from train.report_to"
                ) from e
            started.trackers.append(tracker)
        if state:
            atomic_write_text(state_path, json.dumps(state) + "\n")
        return started

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Send the numeric values of `metrics` to every tracker at `step`."""
        values = numeric(metrics)
        if not values:
            return
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table, to the trackers that show one (wandb); the others get its numeric cells as
        scalars `name/<first column>/<column>` at step 0."""
        scalars = {
            f"{name}/{row[0]}/{col}": cell
            for row in rows
            for col, cell in numeric(dict(zip(columns[1:], row[1:]))).items()
            if math.isfinite(cell)
        }
        for tracker in self.trackers:
            if tracker.name == "wandb":
                tracker.log_table(name, columns=columns, data=rows, step=0)
            if scalars:
                tracker.log(scalars, step=0)

    def finish(self) -> None:
        """Close every tracker run (once; a second call does nothing)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()

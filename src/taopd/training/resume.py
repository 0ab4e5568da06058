"""What a `--resume` may change: the run's saved config.yaml against the new config.

A resumed run continues the experiment its checkpoint belongs to, so what defines that
experiment (the models, the task, rollouts, selection, loss, seeds, the batch, ...) must be as
saved: any difference is refused with the list of them. `CHANGEABLE_ON_RESUME` names what is
meant to change between the parts of a run; those changes are printed ("resuming from step N;
changed: ...") and recorded: config.yaml is rewritten with them and summary.json lists each
resume (`resumes`). A run that already finished is not trained or evaluated again unless
train.steps was raised (`finished_run`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from ..config import Config
from ..errors import UserError

__all__ = [
    "CHANGEABLE_ON_RESUME", "Change", "config_changes", "finished_message", "finished_run",
    "finished_summary", "resume_changes", "resuming_line", "say_finished",
]  # fmt: skip

CHANGEABLE_ON_RESUME: tuple[str, ...] = (
    "output_dir",
    "train.steps",
    "train.eval_every", "train.save_every", "train.keep_last", "train.samples_every",
    "train.log_every", "train.eval_teacher", "eval.batch_size",
    "train.report_to", "train.tensorboard", "train.tracker_project", "train.run_name",
    "train.tracker_group",
    "train.threads", "train.collective_timeout_s", "train.max_nonfinite_steps",
    "train.micro_batch_size", "train.grad_pass", "selection.chunk_size", "loss.chunk_size",
    "optim.lr", "optim.grad_clip",
    "teacher_server.url", "teacher_server.timeout_s", "teacher_server.connect_timeout_s",
    "teacher_server.batch_size", "teacher_server.retries", "teacher_server.backoff_s",
    "rollout.vllm.gpu_memory_utilization", "rollout.vllm.enforce_eager",
    "diagnose",
)  # fmt: skip
"""The config fields (a section name covers all of it) a `--resume` may change; every other
difference from the run's saved config.yaml is refused. They are: where the run folder is
(`output_dir`, e.g. a moved folder); how long it runs (`train.steps`, not below the checkpoint's
step); the cadence of evaluation, checkpoints and token-view samples, and the teacher's one-off
accuracy; trackers and run names; threads and timeouts; memory knobs that leave every number
the same (micro-batches, the gradient pass, scoring and loss chunks, eval.batch_size); the
learning rate and gradient clip (what a stop on non-finite steps says to lower before resuming);
where a served teacher is and how it is asked; vLLM's memory share and eager mode; and the
`diagnose` section, which training does not read. The `--resume` and `--no-progress` flags are
not config and may always differ."""


class Change(NamedTuple):
    """One config field that differs between the saved run and the resumed one."""

    field: str  # dotted, e.g. selection.ratio
    saved: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field} {_show(self.saved)} → {_show(self.new)}"


_UNSET = object()


def _show(value: Any) -> str:
    """A config value as in YAML, short: null, true, 0.0001, teachability, {r: 4}."""
    if value is _UNSET:
        return "(unset)"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(", ", ": "))
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def changeable(field: str) -> bool:
    """Whether `field` (dotted) is in `CHANGEABLE_ON_RESUME`, or in a section named there."""
    return any(field == f or field.startswith(f + ".") for f in CHANGEABLE_ON_RESUME)


def config_changes(saved: Any, new: Any, shared_only: bool = False, at: str = "") -> list[Change]:
    """Every leaf field whose value differs between two config dicts (a section set on one side
    and null on the other is one change). `shared_only`: skip keys one side lacks."""
    if not (isinstance(saved, dict) and isinstance(new, dict)):
        return [] if saved == new else [Change(at, saved, new)]
    out: list[Change] = []
    for key in [*saved, *(k for k in new if k not in saved)]:
        a, b = saved.get(key, _UNSET), new.get(key, _UNSET)
        if shared_only and _UNSET in (a, b):
            continue
        out += config_changes(a, b, shared_only, f"{at}.{key}" if at else str(key))
    return out


def _saved_config(out: Path) -> tuple[dict[str, Any], bool] | None:
    """The run's config.yaml as a full config dict (defaults filled in; second item True), or
    as written when this taopd cannot read it whole (False); None: none or unreadable."""
    try:
        data = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        return Config.model_validate(data).model_dump(mode="json"), True
    except Exception:  # noqa: BLE001 - an older config: compare the keys both sides have
        return data, False


def resume_changes(out: Path, cfg: Config) -> list[Change]:
    """The differences between the run's saved config and `cfg`: a UserError listing those that
    change the experiment; the accepted ones (`CHANGEABLE_ON_RESUME`) are returned."""
    saved = _saved_config(out)
    if saved is None:
        return []
    changes = config_changes(saved[0], cfg.model_dump(mode="json"), shared_only=not saved[1])
    fixed = [c for c in changes if not changeable(c.field)]
    if fixed:
        listed = "; ".join(f"{c.field}: {_show(c.saved)} → {_show(c.new)}" for c in fixed)
        raise UserError(
            f"--resume: this config changes the experiment of the run in {out} ({listed}); a "
            f"resumed run keeps it: resume with the settings of {out / 'config.yaml'}, or start "
            "a new run in another output_dir. What may change on resume: train.steps, the "
            "evaluation and checkpoint cadence, trackers, threads, memory settings, optim.lr "
            "(the manual's Training page, 'Resuming a run')"
        )
    return changes


def resuming_line(step: int, changes: list[Change]) -> str:
    """The line a resume prints: its step, and what changed."""
    changed = "; changed: " + ", ".join(map(str, changes)) if changes else ""
    return f"taopd: resuming from step {step}{changed}"


def finished_summary(out: Path, steps: int) -> dict[str, Any] | None:
    """The summary.json of a run in `out` that finished at `steps` or later (None: it did not)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    done = isinstance(summary, dict) and isinstance(summary.get("steps"), int)
    return summary if done and summary["steps"] >= steps else None


def finished_message(out: Path, summary: dict[str, Any]) -> str:
    """What resuming a finished run prints (nothing is trained, evaluated or written)."""
    n = summary["steps"]
    return (
        f"taopd: the run in {out} already finished at step {n}: nothing trained, evaluated or "
        f"written; to train it further, raise train.steps (e.g. --set train.steps={2 * n})"
    )


def finished_run(cfg: Config) -> dict[str, Any] | None:
    """`--resume` of a finished run (marked, with a summary.json at train.steps or later): its
    summary, after the config check, with a line saying so; None: the run goes on as usual.

    Reads the folder only, so a finished run costs no model load."""
    from .run_dir import marker_kind

    out = Path(cfg.output_dir)
    summary = finished_summary(out, cfg.train.steps)
    if summary is None or marker_kind(out) != "train":
        return None
    resume_changes(out, cfg)  # an experiment's change is refused, finished or not
    return say_finished(out, summary, os.environ.get("RANK", "0") == "0")


def say_finished(out: Path, summary: dict[str, Any], main: bool = True) -> dict[str, Any]:
    """Print (on the main process) that the run in `out` already finished; return `summary`."""
    if main:
        print(finished_message(out, summary), file=sys.stderr, flush=True)
    return summary

"""Selection strategies side by side: one training run per arm and seed, resumable, then tables.

Every arm uses the same config (rollout budget, optimizer steps, seeds); only the selection
(strategy, ratio, K) and the batch size vary. Arms run as `taopd train` subprocesses; a finished
arm (summary.json present) is never rerun, a killed one resumes from its last checkpoint.
This module runs the sweep; `arms.py` plans it, `compare_tables.py` writes its tables and plots.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..errors import UserError
from ..training.checkpoint import atomic_write_text, latest_checkpoint
from .arms import Arm, parse_arm_label, plan_arms, with_lrs
from .compare_tables import CSV_FIELDS, aggregate, mean_curve, paired_differences, write_results

__all__ = [
    "Arm",
    "plan_arms",
    "run_compare",
    "prune_checkpoints",
    "choose_lrs",
    "with_lrs",
    "paired_differences",
    "aggregate",
    "mean_curve",
    "CSV_FIELDS",
    "collect",
    "parse_arm_label",
    "write_results",
]


def _arm_done(folder: Path) -> bool:
    return (folder / "summary.json").exists()


KEEP = ("final", "all", "none")


def prune_checkpoints(folder: Path, keep: str) -> None:
    """After an arm finished: keep its final weights as `folder/model/` ("final"), nothing
    ("none") or every checkpoint as written ("all"). The optimizer state of a finished arm is
    never needed again, and at 1.6 GB a checkpoint of the 135M student, a sweep of 25 arms
    would otherwise fill the disk."""
    if keep == "all":
        return
    ckpts = folder / "checkpoints"
    latest = latest_checkpoint(ckpts)
    if keep == "final" and latest is not None and (latest / "model").is_dir():
        if (folder / "model").exists():
            shutil.rmtree(folder / "model")
        os.replace(latest / "model", folder / "model")
    shutil.rmtree(ckpts, ignore_errors=True)


def _launch(cfg_path: Path, folder: Path, threads: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "taopd", "train", str(cfg_path), "--no-progress"]
    if latest_checkpoint(folder / "checkpoints") is not None:
        args.append("--resume")
    elif folder.exists():
        args.append("--overwrite")  # a killed arm with no checkpoint yet: start it again
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def run_compare(
    cfg: Config,
    out: Path,
    arms: list[Arm],
    parallel: int = 1,
    progress: bool = True,
    run: bool = True,
    keep: str = "final",
) -> list[dict[str, Any]]:
    """Run (or resume) every arm under out/arms/, then write results.{csv,md} and plots.

    `run=False` trains nothing: the tables and plots cover the arms already finished. `keep`
    says what of a finished arm's checkpoints stays (`prune_checkpoints`).
    """
    if keep not in KEEP:
        raise UserError(f"keep checkpoints: {keep!r} is not one of {', '.join(KEEP)}")
    from ..training.run_dir import marker_kind, refuse_foreign, write_marker

    if marker_kind(out) not in (None, "compare"):
        raise UserError(f"{out} holds a taopd {marker_kind(out)} run; give compare its own folder")
    refuse_foreign(out, "write into", but=("grid",))  # the --lr-grid points go first, in grid/
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "compare")
    (out / "arms").mkdir(exist_ok=True)
    atomic_write_text(out / "base_config.yaml", cfg.to_yaml())
    threads = max(1, (os.cpu_count() or 1) // max(1, parallel))
    pending = _arm_configs(cfg, out, arms, threads)
    if not run:
        pending = []
    if pending:
        # fine-tune (and cache) the shared teacher and warm start once, not once per arm
        from ..training.sft import prepare_student, prepare_teacher
        from ..training.trackers import check_trackers

        check_trackers(cfg.train)  # a missing tracker package: one line, before any arm
        if cfg.teacher_sft is not None:
            prepare_teacher(cfg, progress=progress)
        if cfg.student_sft is not None:
            prepare_student(cfg, progress=progress)
    failed = _run_arms(out, pending, len(arms), parallel, threads, keep, progress)
    rows = collect(out, arms)
    write_results(out, rows)
    if failed:
        raise UserError(
            f"{len(failed)} arm(s) failed: {', '.join(failed)}; see their logs in {out / 'arms'}; "
            "rerun the same command to retry them (finished arms are kept)"
        )
    return rows


def _arm_configs(
    cfg: Config, out: Path, arms: list[Arm], threads: int
) -> list[tuple[Arm, Path, Path]]:
    """(arm, folder, config file) of every unfinished arm, its config written under out/arms/."""
    # train.report_to: one tracker run per arm, named after it, grouped by the sweep's folder
    group = cfg.train.tracker_group or out.resolve().name
    pending = []
    for i, arm in enumerate(arms):
        folder = out / "arms" / arm.name
        if _arm_done(folder):
            continue
        # teacher and initial-student accuracy are the same for every arm of a seed: the first
        # arm of each seed measures them, the others skip the two evaluations
        first_of_seed = all(a.seed != arm.seed or a.batch_size != arm.batch_size for a in arms[:i])
        data = cfg.model_dump(mode="json")
        data["train"].update(run_name=arm.name, tracker_group=group)  # not parsed as YAML
        overrides = arm.overrides() + [
            f"output_dir={folder}",
            f"train.eval_teacher={str(first_of_seed).lower()}",
            f"train.eval_before={str(first_of_seed).lower()}",
            f"train.threads={cfg.train.threads or threads}",  # the user's choice wins
        ]
        arm_cfg = load_config(data, overrides)
        cfg_path = out / "arms" / f"{arm.name}.yaml"
        atomic_write_text(cfg_path, arm_cfg.to_yaml())
        pending.append((arm, folder, cfg_path))
    return pending


def _run_arms(
    out: Path,
    pending: list[tuple[Arm, Path, Path]],
    total: int,
    parallel: int,
    threads: int,
    keep: str,
    progress: bool,
) -> list[str]:
    """Train the `pending` arms, `parallel` subprocesses at a time, pruning each finished one's
    checkpoints (`keep`); returns the names of the arms that failed."""
    from tqdm.auto import tqdm

    pending = list(pending)
    running: list[tuple[Arm, subprocess.Popen]] = []
    failed: list[str] = []
    bar = tqdm(total=total, initial=total - len(pending), desc="compare arms", disable=not progress)
    while pending or running:
        while pending and len(running) < parallel:
            arm, folder, cfg_path = pending.pop(0)
            log = out / "arms" / f"{arm.name}.log"
            running.append((arm, _launch(cfg_path, folder, threads, log)))
        time.sleep(0.5)
        for item in list(running):
            arm, proc = item
            if proc.poll() is not None:
                running.remove(item)
                bar.update(1)
                if proc.returncode != 0:
                    failed.append(arm.name)
                elif _arm_done(out / "arms" / arm.name):
                    prune_checkpoints(out / "arms" / arm.name, keep)
    bar.close()
    return failed


def choose_lrs(
    cfg: Config,
    out: Path,
    arms: list[Arm],
    lrs: list[float],
    steps: int | None = None,
    parallel: int = 1,
    progress: bool = True,
) -> dict[tuple[str, float, int, int], float]:
    """The learning rate of each arm group: the grid point with the lowest held-out KL on the
    validation split after `steps` steps (default train.steps), one seed (the first).

    Runs (or resumes) the grid under `out` with eval.split=validation (disjoint from train and
    test) and no accuracy evaluation; writes lr_choice.{json,md}. Held-out KL, not accuracy: it
    is what OPD minimizes, it is measured on one fixed bank for every point (so points differ by
    the lr alone), and 200-problem accuracy after a few steps moves by ±7 points by chance.
    """
    if not lrs or any(not lr > 0 for lr in lrs):
        raise UserError(f"--lr-grid: give positive learning rates, got {lrs}")
    steps = steps or cfg.train.steps
    grid_cfg = _grid_config(cfg, out, steps)
    seed = min(a.seed for a in arms)
    groups = list(dict.fromkeys(a for a in arms if a.seed == seed))
    grid = [replace(a, lr=lr) for a in groups for lr in lrs]
    rows = run_compare(grid_cfg, out, grid, parallel=parallel, progress=progress, keep="none")
    kl = {(Arm.from_row(r).group, float(r["lr"])): r["heldout_kl"] for r in rows}
    choice: dict[tuple[str, float, int, int], float] = {}
    lines = [
        f"# Learning rates chosen on the validation split ({steps} steps, seed {seed})",
        "",
        "Held-out KL(student‖teacher) on the validation bank after the grid run; the lowest wins.",
        "",
        "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
        "|---|" + "---|" * (len(lrs) + 1),
    ]
    for a in groups:
        values = {lr: kl.get((a.group, lr)) for lr in lrs}
        done = {lr: v for lr, v in values.items() if v is not None and math.isfinite(v)}
        if not done:
            raise UserError(f"lr grid: no finished point for {a.label} {a.ratio:g} in {out}")
        choice[a.group] = min(done, key=done.get)
        cells = " | ".join("n/a" if values[lr] is None else f"{values[lr]:.4f}" for lr in lrs)
        lines.append(f"| {a.label} {a.ratio:g} | {cells} | **{choice[a.group]:g}** |")
    atomic_write_text(out / "lr_choice.md", "\n".join(lines) + "\n")
    atomic_write_text(
        out / "lr_choice.json",
        json.dumps([{"arm": list(g), "lr": lr} for g, lr in choice.items()], indent=2),
    )
    return choice


def _grid_config(cfg: Config, out: Path, steps: int) -> Config:
    """The grid points' config: `steps` steps, held-out KL on the validation split, no accuracy
    evaluation; their tracker runs in their own group, "<sweep folder>-<grid folder>"."""
    grid_cfg = load_config(
        cfg.model_dump(mode="json"),
        [
            "eval.split=validation",
            "eval.accuracy=false",
            f"train.steps={steps}",
            "train.eval_every=0",
            "train.samples_every=0",
            f"train.save_every={min(steps, cfg.train.save_every or steps)}",
        ],
    )
    grid_cfg.train.tracker_group = (
        f"{cfg.train.tracker_group or out.resolve().parent.name}-{out.name}"
    )
    return grid_cfg


def collect(out: Path, arms: list[Arm]) -> list[dict[str, Any]]:
    """One row per finished arm (CSV_FIELDS), teacher/before accuracy shared per seed."""
    rows = []
    shared: dict[tuple[int, int], dict[str, Any]] = {}
    summaries = {}
    for arm in arms:
        path = out / "arms" / arm.name / "summary.json"
        if path.exists():
            summaries[arm] = json.loads(path.read_text())
            s = summaries[arm]
            if s.get("teacher_accuracy") is not None:
                shared[(arm.seed, arm.batch_size)] = s
    for arm, s in summaries.items():
        base = shared.get((arm.seed, arm.batch_size), {})
        rows.append(
            {
                "arm": arm.name,  # its folder under arms/ (not a CSV column)
                "strategy": arm.label,
                "ratio": arm.ratio,
                "k": arm.k,
                "batch_size": arm.batch_size,
                "seed": arm.seed,
                "lr": arm.lr if arm.lr is not None else s.get("lr"),
                "accuracy": s["student_accuracy_after"],
                "accuracy_before": s.get("student_accuracy_before")
                or base.get("student_accuracy_before"),
                "teacher_accuracy": s.get("teacher_accuracy") or base.get("teacher_accuracy"),
                "tokens_trained": s["tokens_trained"],
                "steps": s["steps"],
                "wall_seconds": round(s["wall_seconds"], 1),
                "heldout_kl": s.get("heldout_kl"),
                "heldout_kl_before": s.get("heldout_kl_before"),
                "heldout_kl_other": s.get("heldout_kl_other"),
                "selected_fraction": s.get("selected_fraction"),
                "kept_per_step": round(s["tokens_trained"] / max(1, s["steps"]), 1),
            }
        )
    return rows

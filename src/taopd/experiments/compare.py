"""Selection strategies side by side: one training run per arm and seed, resumable, then tables.

Every arm uses the same config (rollout budget, optimizer steps, seeds); only the selection
(strategy, ratio, K) and the batch size vary. Arms run as `taopd train` subprocesses; a finished
arm (summary.json present) is never rerun, a killed one resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..errors import UserError
from ..training.checkpoint import atomic_write_text, latest_checkpoint

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
]

CSV_FIELDS = [
    "strategy",
    "ratio",
    "k",
    "batch_size",
    "seed",
    "lr",
    "accuracy",
    "accuracy_before",
    "teacher_accuracy",
    "tokens_trained",
    "steps",
    "wall_seconds",
    "heldout_kl",
    "heldout_kl_before",
    "heldout_kl_other",
    "selected_fraction",
    "kept_per_step",
]

# two-sided 95% Student-t quantiles by degrees of freedom (1..30); normal beyond
_T95 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


@dataclass(frozen=True)
class Arm:
    """One run of the comparison. `min_per_sequence` > 0 is the released budget rule (at least
    that many kept positions per rollout), labelled `strategy+N` (e.g. `teachability+1`);
    `normalize="valid"` the fixed per-token weight (`loss.normalize`), labelled `strategy:valid`;
    `lr` (None: the config's optim.lr) the arm's learning rate, chosen by `--lr-grid`."""

    strategy: str
    ratio: float
    k: int
    batch_size: int
    seed: int
    min_per_sequence: int = 0
    normalize: str = "kept"
    lr: float | None = None

    @property
    def label(self) -> str:
        return (
            self.strategy
            + (f"+{self.min_per_sequence}" if self.min_per_sequence else "")
            + (":valid" if self.normalize == "valid" else "")
        )

    @property
    def name(self) -> str:
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.label}-r{self.ratio:g}-k{self.k}-b{self.batch_size}{lr}-s{self.seed}"

    @property
    def group(self) -> tuple[str, float, int, int]:
        return (self.label, self.ratio, self.k, self.batch_size)

    def overrides(self) -> list[str]:
        return [
            f"selection.strategy={self.strategy}",
            f"selection.ratio={self.ratio}",
            f"selection.k={self.k}",
            f"selection.min_per_sequence={self.min_per_sequence}",
            f"loss.normalize={self.normalize}",
            f"train.batch_size={self.batch_size}",
            f"train.seed={self.seed}",
        ] + ([] if self.lr is None else [f"optim.lr={self.lr}"])

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Arm:
        label, _, norm = str(row["strategy"]).partition(":")
        strategy, minimum = parse_arm_label(label)
        lr = row.get("lr")
        return cls(
            strategy, row["ratio"], row["k"], row["batch_size"], row["seed"], minimum,
            norm or "kept", None if lr in (None, "") else float(lr),
        )  # fmt: skip


def parse_arm_label(label: str) -> tuple[str, int]:
    """'teachability+1' → ('teachability', 1): a strategy and the released at-least-N-per-
    rollout rule (`selection.min_per_sequence`); a bare name → (name, 0)."""
    from ..core.selection import STRATEGIES

    name, plus, count = label.strip().partition("+")
    if name not in STRATEGIES:
        raise UserError(
            f"unknown strategy {name!r}; choose from {', '.join(sorted(STRATEGIES))} "
            "(a '+N' suffix, e.g. teachability+1, keeps at least N positions per rollout; "
            "a ':valid' suffix normalizes the loss by all valid positions)"
        )
    if not plus:
        return name, 0
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"strategy {label!r}: the suffix must be '+N' with N >= 1 (e.g. +1)")
    if name == "full":
        raise UserError(f"strategy {label!r}: full already keeps every position")
    return name, int(count)


def _parse_normalize(label: str) -> tuple[str, str]:
    """'teachability:valid' → ('teachability', 'valid'); a label without ':' → (label, 'kept')."""
    base, colon, norm = label.strip().partition(":")
    if colon and norm not in ("kept", "valid"):
        raise UserError(f"strategy {label!r}: the suffix after ':' must be 'kept' or 'valid'")
    return base, norm or "kept"


def plan_arms(
    strategies: list[str], ratios: list[float], seeds: int, ks: list[int], batch_sizes: list[int]
) -> list[Arm]:
    """All arms; `full` keeps every position, so it runs once at ratio 1 (and one K).
    A strategy `name+N` keeps at least N positions per rollout (the released rule)."""
    parsed = []
    for label in strategies:
        base, norm = _parse_normalize(label)
        parsed.append((*parse_arm_label(base), norm))
    for r in ratios:
        if not 0 < r <= 1:
            raise UserError(f"--ratios: each ratio must be in (0, 1], got {r}")
    arms: list[Arm] = []
    for bs in batch_sizes:
        for seed in range(seeds):
            for s, minimum, norm in parsed:
                uses_k = s not in ("full", "random", "entropy", "reverse_kl")
                for k in ks if uses_k else ks[:1]:
                    for r in [1.0] if s == "full" else ratios:
                        arms.append(Arm(s, r, k, bs, seed, minimum, norm))
    return arms


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
    from tqdm.auto import tqdm

    from ..training.run_dir import marker_kind, write_marker

    if marker_kind(out) not in (None, "compare"):
        raise UserError(f"{out} holds a taopd {marker_kind(out)} run; give compare its own folder")
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "compare")
    (out / "arms").mkdir(exist_ok=True)
    atomic_write_text(out / "base_config.yaml", cfg.to_yaml())
    threads = max(1, (os.cpu_count() or 1) // max(1, parallel))
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
    if not run:
        pending = []
    if pending:
        from ..training.sft import prepare_student, prepare_teacher
        from ..training.trackers import check_trackers

        check_trackers(cfg.train)  # a missing tracker package: one line, before any arm
        # fine-tune (and cache) the shared teacher and warm start once, not once per arm

        if cfg.teacher_sft is not None:
            prepare_teacher(cfg, progress=progress)
        if cfg.student_sft is not None:
            prepare_student(cfg, progress=progress)
    running: list[tuple[Arm, subprocess.Popen]] = []
    failed: list[str] = []
    bar = tqdm(
        total=len(arms), initial=len(arms) - len(pending), desc="compare arms", disable=not progress
    )
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
    rows = collect(out, arms)
    write_results(out, rows)
    if failed:
        raise UserError(
            f"{len(failed)} arm(s) failed: {', '.join(failed)}; see their logs in {out / 'arms'}; "
            "rerun the same command to retry them (finished arms are kept)"
        )
    return rows


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
    # the grid's tracker runs: their own group, "<sweep folder>-<grid folder>"
    grid_cfg.train.tracker_group = (
        f"{cfg.train.tracker_group or out.resolve().parent.name}-{out.name}"
    )
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


def with_lrs(arms: list[Arm], choice: dict[tuple[str, float, int, int], float]) -> list[Arm]:
    """The arms, each with its group's chosen learning rate."""
    return [replace(a, lr=choice[a.group]) for a in arms]


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


def _ci95(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    t = _T95[min(len(values) - 1, len(_T95)) - 1] if len(values) - 1 <= len(_T95) else 1.96
    return t * statistics.stdev(values) / math.sqrt(len(values))


def _mean_of(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return statistics.mean(values) if values else float("nan")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± 95% t-interval over seeds for each (strategy, ratio, K, batch size)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["ratio"], r["k"], r["batch_size"]), []).append(r)
    table = []
    for (strategy, ratio, k, bs), rs in groups.items():
        acc = [r["accuracy"] for r in rs if r["accuracy"] not in (None, "")]
        kls = [r["heldout_kl"] for r in rs if r["heldout_kl"] is not None]
        lrs = sorted({float(r["lr"]) for r in rs if r.get("lr") not in (None, "")})
        table.append(
            {
                "strategy": strategy,
                "ratio": ratio,
                "k": k,
                "batch_size": bs,
                "seeds": len(rs),
                "lr": "/".join(f"{x:g}" for x in lrs),
                "accuracy": statistics.mean(acc) if acc else float("nan"),
                "accuracy_ci95": _ci95(acc),
                "tokens_trained": statistics.mean(r["tokens_trained"] for r in rs),
                "selected_fraction": _mean_of(rs, "selected_fraction"),
                "kept_per_step": _mean_of(rs, "kept_per_step"),
                "wall_seconds": statistics.mean(r["wall_seconds"] for r in rs),
                "heldout_kl": statistics.mean(kls) if kls else float("nan"),
                "heldout_kl_other": _mean_of(rs, "heldout_kl_other"),
            }
        )
    table.sort(key=lambda r: (r["batch_size"], -r["ratio"], r["strategy"], r["k"]))
    return table


def _markdown(rows: list[dict[str, Any]]) -> str:
    table = aggregate(rows)
    before = [r["accuracy_before"] for r in rows if r.get("accuracy_before") is not None]
    teacher = [r["teacher_accuracy"] for r in rows if r.get("teacher_accuracy") is not None]
    lines = ["# Selection strategies compared", ""]
    if before:
        lines.append(
            f"Student before training: {100 * statistics.mean(before):.1f}%; "
            f"teacher: {100 * statistics.mean(teacher):.1f}% (mean over seeds)."
        )
        lines.append("")
    other = any(not math.isnan(r["heldout_kl_other"]) for r in table)
    lines.append(
        "| strategy | ratio | lr | effective share | kept / step | K | batch | seeds "
        "| accuracy (mean ± 95% CI) | tokens trained | wall time (s) | held-out KL |"
        + (" held-out KL, non-style |" if other else "")
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if other else ""))
    for r in table:
        ci = "" if math.isnan(r["accuracy_ci95"]) else f" ± {100 * r['accuracy_ci95']:.1f}"
        share = r.get("selected_fraction", float("nan"))
        kept = r.get("kept_per_step", float("nan"))
        acc = "n/a" if math.isnan(r["accuracy"]) else f"{100 * r['accuracy']:.1f}%{ci}"
        lines.append(
            f"| {r['strategy']} | {r['ratio']:g} | {r['lr'] or 'config'} | "
            f"{'n/a' if math.isnan(share) else f'{100 * share:.1f}%'} | "
            f"{'n/a' if math.isnan(kept) else f'{kept:.1f}'} | {r['k']} | {r['batch_size']} | "
            f"{r['seeds']} | {acc} | {r['tokens_trained']:.0f} | "
            f"{r['wall_seconds']:.0f} | {r['heldout_kl']:.4f} |"
            + (f" {r['heldout_kl_other']:.4f} |" if other else "")
        )
    lines.append("")
    diffs = paired_differences(rows)
    if diffs:
        lines += [
            "Paired differences (mean over seeds of the per-seed difference, 95% t-interval; "
            "ahead / behind when the interval excludes 0, else tied):",
            "",
            "| difference | seeds | accuracy (points) | | held-out KL | |",
            "|---|---|---|---|---|---|",
        ]
        for d in diffs:
            lines.append(
                f"| {d['difference']} | {d['seeds']} | {_interval(d['accuracy'], 100)} | "
                f"{d['accuracy_word']} | {_interval(d['heldout_kl'])} | {d['heldout_kl_word']} |"
            )
        lines.append("")
    lines.append(
        "ratio: the nominal share; effective share: the share of response positions actually "
        "trained on (mean over steps; `+N` arms keep at least N per rollout, so more); "
        "kept / step: positions trained on per step."
    )
    return "\n".join(lines) + "\n"


def _interval(x: tuple[float, float, float] | None, scale: float = 1.0) -> str:
    if x is None or math.isnan(x[0]):
        return "n/a"
    m, lo, hi = (scale * v for v in x)
    digits = 1 if scale == 100 else 3
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float] | None:
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return None
    m = statistics.mean(d)
    h = _ci95(d)
    return (m, m - h, m + h)


def _word(x: tuple[float, float, float] | None, higher_is_better: bool) -> str:
    """'ahead' / 'behind' when the interval excludes 0, 'tied' otherwise (n/a: < 2 seeds)."""
    if x is None or math.isnan(x[1]):
        return "n/a"
    if x[1] > 0:
        return "ahead" if higher_is_better else "behind"
    if x[2] < 0:
        return "behind" if higher_is_better else "ahead"
    return "tied"


def paired_differences(rows: list[dict[str, Any]], reference: str = "teachability") -> list[dict]:
    """Per-seed paired differences of the `reference` strategy (at each ratio) against every
    other arm of the same batch size at that ratio, and against full-token OPD: accuracy (higher
    is better) and held-out KL (lower is better), with a 95% t-interval and a word."""
    by_group: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in rows:
        g = by_group.setdefault((r["strategy"], float(r["ratio"]), r["k"], r["batch_size"]), {})
        for key in ("accuracy", "heldout_kl", "heldout_kl_other"):
            if r.get(key) not in (None, ""):
                g.setdefault(key, {})[int(r["seed"])] = float(r[key])
    out = []
    for (label, ratio, _k, bs), ref in sorted(by_group.items(), key=lambda x: -x[0][1]):
        if label != reference:
            continue
        for (other, o_ratio, _ok, o_bs), vals in sorted(by_group.items()):
            if other == reference or o_bs != bs or not (o_ratio == ratio or other == "full"):
                continue
            row: dict[str, Any] = {
                "difference": f"{reference} {ratio:g} − {other}"
                + ("" if other == "full" else f" {o_ratio:g}"),
            }
            for key, better in (("accuracy", True), ("heldout_kl", False)):
                x = _paired(ref.get(key, {}), vals.get(key, {}))
                row[key], row[f"{key}_word"] = x, _word(x, better)
            x = _paired(ref.get("heldout_kl_other", {}), vals.get("heldout_kl_other", {}))
            row["heldout_kl_other"] = x
            row["seeds"] = len(set(ref.get("heldout_kl", {})) & set(vals.get("heldout_kl", {})))
            out.append(row)
    return out


def mean_curve(curves: list[list[list[Any]]]) -> list[list[float]]:
    """Mean over seeds of [step, tokens, accuracy, held-out KL, ...] points, matched by step.

    Only the steps every seed evaluated are kept, so each point averages the same seeds (a seed
    whose 'before' evaluation is missing does not shift the others' points)."""
    by_step = [{int(p[0]): p for p in c} for c in curves]
    common = sorted(set.intersection(*(set(b) for b in by_step))) if by_step else []
    width = min(len(p) for c in curves for p in c) if common else 0
    return [
        [
            statistics.mean(math.nan if b[step][j] is None else float(b[step][j]) for b in by_step)
            for j in range(width)
        ]
        for step in common
    ]


def _curves(out: Path, rows: list[dict[str, Any]]) -> None:
    """Accuracy and held-out KL vs step and vs tokens trained, mean over seeds per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[list[list[float]]]] = {}
    for r in rows:
        arm = Arm.from_row(r)
        s = json.loads((out / "arms" / r.get("arm", arm.name) / "summary.json").read_text())
        curve = s.get("accuracy_curve") or []
        if curve and r.get("accuracy_before") is not None:
            curve = [[0, 0, r["accuracy_before"], r.get("heldout_kl_before")], *curve]
        if curve:
            variant = f"{arm.ratio:g}" + (f" K{arm.k}" if arm.k != 16 else "")
            variant += f" b{arm.batch_size}" if len({x["batch_size"] for x in rows}) > 1 else ""
            groups.setdefault((arm.label, variant), []).append(curve)
    if not groups:
        return
    (out / "plots").mkdir(exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    # one colour per strategy, one line style per ratio / K / batch: 13 arms stay apart
    palette = plt.get_cmap("tab10").colors
    colours = {name: palette[i % 10] for i, name in enumerate(sorted({n for n, _ in groups}))}
    variants = sorted({v for _, v in groups})
    styles = {v: ("-", "--", ":", "-.")[i % 4] for i, v in enumerate(variants)}
    for (name, variant), curves in sorted(groups.items()):
        mean = mean_curve(curves)
        if not mean:
            continue
        steps = [m[0] for m in mean]
        tokens = [m[1] for m in mean]
        style = {"color": colours[name], "linestyle": styles[variant], "marker": "o"}
        label = f"{name} {variant}"
        axes[0][0].plot(steps, [m[2] for m in mean], label=label, **style)
        axes[0][1].plot(tokens, [m[2] for m in mean], label=label, **style)
        if len(mean[0]) > 3:
            axes[1][0].plot(steps, [m[3] for m in mean], label=label, **style)
            axes[1][1].plot(tokens, [m[3] for m in mean], label=label, **style)
    for ax, (x, y) in zip(
        axes.flat,
        [
            ("step", "accuracy"),
            ("tokens trained", "accuracy"),
            ("step", "held-out KL"),
            ("tokens trained", "held-out KL"),
        ],
    ):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0][1].set_xscale("symlog")
    axes[1][1].set_xscale("symlog")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "learning_curves.png", dpi=110)
    plt.close(fig)


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    """results.csv (one row per arm and seed), results.md (aggregated), plots, report.html."""
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r["strategy"], r["ratio"], r["k"], r["seed"])):
            writer.writerow(r)
    if not rows:
        return
    atomic_write_text(out / "results.md", _markdown(rows))
    _curves(out, rows)
    from ..reports.report import render_report

    render_report(out)

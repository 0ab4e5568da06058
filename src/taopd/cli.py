"""`taopd` command line: demo, train, eval, report (and the diagnostic and comparison tools)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .errors import UserError, notice, quiet_deepspeed_notice
from .experiments.pilot import pct as _pct

__all__ = ["main"]


def _add_config_args(
    p: argparse.ArgumentParser,
    config: str | None = "required",
    output_help: str = "run folder (overrides output_dir)",
) -> None:
    """CONFIG (required, optional or none), --set, --output-dir and --no-progress."""
    if config is not None:
        p.add_argument(
            "config",
            nargs=None if config == "required" else "?",
            default=None,
            help="YAML config file, or the name of a shipped recipe (e.g. demo)",
        )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set selection.ratio=0.1 (repeatable)",
    )
    p.add_argument("--output-dir", help=output_help)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _load(args: argparse.Namespace) -> Any:
    from .config import load_config

    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def print_summary(summary: dict[str, Any], title: str) -> None:
    s = summary
    arm = f"{s['strategy']}{'@weight' if s.get('mode') == 'weight' else ''} {s['ratio']:g}"
    rows = [
        ("teacher accuracy", _pct(s.get("teacher_accuracy"))),
        ("student accuracy before", _pct(s.get("student_accuracy_before"))),
        (f"student accuracy after ({arm})", _pct(s.get("student_accuracy_after"))),
        ("held-out problems", str(s["n_test"])),
        ("steps", str(s["steps"])),
        (
            "tokens trained on",
            f"{s['tokens_trained']} ({_pct(s['selected_fraction'])} of response tokens)",
        ),
        ("wall time", f"{s['wall_seconds'] / 60:.1f} min"),
    ]
    print(f"\n{title}\n{_table(rows)}\n\nrun folder: {s['output_dir']}")


def _resume_command(args: argparse.Namespace, out: Path) -> str:
    """The command that resumes a stopped `taopd train` or `taopd demo` run in `out`."""
    import shlex

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "the same launch command with --resume (instead of --overwrite)"
    config = args.config if args.func is cmd_train else "demo"
    sets = [x for item in args.overrides for x in ("--set", item)]
    argv = ["taopd", "train", config, *sets, "--output-dir", str(out), "--resume"]
    return shlex.join(argv)


def _stopped(args: argparse.Namespace, e: Any) -> int:
    """A run stopped by SIGINT/SIGTERM (`RunStopped`): one calm line; exit 128 + the signal."""
    import signal

    if os.environ.get("RANK", "0") == "0":
        how = _resume_command(args, e.out) if args.func in (cmd_train, cmd_demo) else None
        print(f"taopd: {e}{f'; resume with: {how}' if how else ''}", file=sys.stderr, flush=True)
    return 128 + int(getattr(signal.Signals, e.signal_name, signal.SIGTERM))


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)  # before importing torch: a config mistake is reported at once
    from .training.collectives import leave_process_group
    from .training.train import train

    summary = train(
        cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
    )
    if os.environ.get("RANK", "0") == "0":  # one summary per launch, not one per process
        print_summary(summary, "taopd train")
    leave_process_group()  # multi-process: exits here
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training.train import train

    overrides = list(args.overrides)
    out = args.output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides.append(f"output_dir={out}")
    cfg = load_config("demo", overrides)
    print(
        f"taopd demo: {cfg.teacher} (fine-tuned on {cfg.task.name}) -> {cfg.student}, "
        f"{cfg.selection.strategy} at {cfg.selection.ratio:g}, {cfg.train.steps} steps of "
        f"{cfg.train.batch_size} prompts; run folder {out}",
        flush=True,
    )
    summary = train(cfg, progress=not args.no_progress)
    print_summary(summary, "taopd demo: selective on-policy distillation")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data import make_task, size_notice
    from .models import load_model, load_tokenizer
    from .training.evaluate import evaluate
    from .training.threads import set_threads

    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be a positive number of test problems, got {args.n}")
    cfg = _load(args)
    name = args.model or cfg.student
    ckpt = Path(name)
    if (ckpt / "model" / "config.json").exists():  # a checkpoint folder
        name = str(ckpt / "model")
    task = make_task({**cfg.task.as_task_dict(), "suffix": cfg.task.prompt_suffix or None})
    n = args.n if args.n is not None else cfg.task.n_test
    examples = task.examples("test", n, seed=cfg.task.seed)
    key = "--n" if args.n is not None else "task.n_test"
    if cut := size_notice(task, "test", n, len(examples), key):
        notice(cut)
    # the device and threads `taopd train` evaluates with: on a CPU that other jobs share,
    # torch's default (one thread per core) made generation many times slower (issue 33)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = set_threads(cfg.train.threads, device)
    tok = load_tokenizer(name)
    model = load_model(name, dtype=cfg.train.dtype, device=device)
    res = evaluate(
        model,
        tok,
        task,
        examples,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        system_prompt=cfg.task.system_prompt,
        progress=not args.no_progress,
        chat_template=cfg.task.chat_template,
    )
    res.update(device=str(device), threads=threads)
    where = f"{threads} CPU thread{'s' if threads > 1 else ''}" if device.type == "cpu" else device
    print(
        f"{name}: accuracy {_pct(res['accuracy'])} on {res['n']} held-out "
        f"{cfg.task.name or cfg.task.path} problems ({res['seconds']:.0f} s, {where})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .experiments.diagnose import run_diagnose

    cfg = _load(args)
    s = run_diagnose(
        cfg,
        mode=args.mode,
        bank_path=args.bank,
        relative=True if args.relative else False if args.absolute else None,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"\ntaopd diagnose ({s['mode']}): {s['n_positions']} positions of {s['n_contexts']} "
        f"contexts, mean KL0 {s['kl0_mean']:.4g}, mean gain {s['gain_mean']:.4g} "
        f"({s['wall_seconds'] / 60:.1f} min)"
    )
    print(Path(s["output_dir"], "diagnose.md").read_text().split("## Standardized")[0].rstrip())
    print(f"\nrun folder: {s['output_dir']} (diagnose.md, report.html)")
    return 0


def cmd_pilot(args: argparse.Namespace) -> int:
    from .experiments.pilot import pilot, pilot_report

    cfg = _load(args)
    rows = pilot(cfg, steps=args.steps, progress=not args.no_progress)
    print(f"\ntaopd pilot: {cfg.task.name or cfg.task.path}, {cfg.train.batch_size} prompts a step")
    print(pilot_report(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .reports.report import render_report
    from .reports.token_view import SIGNAL_CHOICES
    from .training.run_dir import check_report_folder

    if args.signal not in SIGNAL_CHOICES:
        raise UserError(
            f"--signal {args.signal!r} is not a token-view signal; use one of "
            f"{', '.join(SIGNAL_CHOICES)}"
        )
    check_report_folder(Path(args.run_dir))
    notes: list[str] = []
    path = render_report(Path(args.run_dir), signal=args.signal, notes=notes)
    for note in notes:
        print(f"note: {note}")
    print(f"report: {path}")
    return 0


def _csv(kind: type) -> Any:
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            msg = f"expected comma-separated values, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None

    return parse


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiments.compare import choose_lrs, plan_arms, run_compare, with_lrs

    for flag, value in (("--seeds", args.seeds), ("--parallel", args.parallel)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    for flag, values in (("--strategies", args.strategies), ("--ratios", args.ratios)):
        if not values:
            raise UserError(f"{flag} is empty: give at least one value (comma-separated)")
    for flag, values in (("--k", args.k), ("--batch-sizes", args.batch_sizes)):
        if values is not None and not values:
            raise UserError(f"{flag} is empty: give at least one value (comma-separated)")
    cfg = _load(args)
    out = Path(args.output_dir or cfg.output_dir)
    arms = plan_arms(
        args.strategies,
        args.ratios,
        args.seeds,
        args.k or [cfg.selection.k],
        args.batch_sizes or [cfg.train.batch_size],
    )
    if args.lr_grid:
        from .training.run_dir import refuse_foreign

        refuse_foreign(out, "write into", but=("grid",))  # before the grid goes in there
        grid_out = out / "grid"
        print(
            f"taopd compare: lr grid {args.lr_grid} on the validation split in {grid_out}",
            flush=True,
        )
        choice = choose_lrs(
            cfg, grid_out, arms, args.lr_grid, args.grid_steps, args.parallel,
            progress=not args.no_progress,
        )  # fmt: skip
        print((grid_out / "lr_choice.md").read_text())
        arms = with_lrs(arms, choice)
    print(f"taopd compare: {len(arms)} runs in {out} ({args.parallel} at a time)", flush=True)
    rows = run_compare(
        cfg,
        out,
        arms,
        parallel=args.parallel,
        progress=not args.no_progress,
        run=not args.no_run,
        keep=args.keep_checkpoints,
    )
    if args.no_run:
        print(f"{len(rows)} of {len(arms)} runs finished; tables from those in {out}")
    if not rows:
        raise UserError(f"no run in {out} has finished yet: nothing to table (drop --no-run)")
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.csv'}, {out / 'results.md'}, {out / 'report.html'}")
    return 0


def _add_compare(sub: Any) -> None:
    """`taopd compare`: strategies × ratios × K × batch sizes × seeds."""
    p = sub.add_parser(
        "compare",
        help="selection strategies side by side over seeds",
        description="Train one run per strategy × ratio × K × batch size × seed "
        "with the same budget; resumable (finished arms are not rerun). Writes "
        "results.csv, results.md, learning curves and report.html.",
    )
    _add_config_args(p)
    p.add_argument(
        "--strategies",
        type=_csv(str),
        default=["full", "random", "entropy", "reverse_kl", "teachability", "tip"],
        help="comma-separated strategy names; 'name+N' keeps at least N positions per rollout "
        "(the released budget rule), e.g. teachability+1",
    )
    p.add_argument("--ratios", type=_csv(float), default=[0.05, 0.2], help="e.g. 0.05,0.2")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--k", type=_csv(int), default=None, help="teachability K values, e.g. 1,5,16")
    p.add_argument("--batch-sizes", type=_csv(int), default=None, help="prompts per step")
    p.add_argument("--parallel", type=int, default=1, help="arms running at once")
    p.add_argument(
        "--lr-grid",
        type=_csv(float),
        default=None,
        help="choose each arm's optim.lr from these (e.g. 1e-5,3e-5,1e-4): the lowest held-out "
        "KL on the validation split, first seed, written to OUTPUT/grid/lr_choice.md",
    )
    p.add_argument(
        "--grid-steps", type=int, default=None, help="steps per lr-grid point (train.steps)"
    )
    p.add_argument(
        "--no-run",
        action="store_true",
        help="train nothing: write the tables and plots of the arms already finished",
    )
    p.add_argument(
        "--keep-checkpoints",
        choices=["final", "all", "none"],
        default="final",
        help="what of a finished arm's checkpoints stays: its final weights as ARM/model/ "
        "(default), every checkpoint, or nothing; lr-grid runs keep nothing",
    )
    p.set_defaults(func=cmd_compare)


def _add_diagnose(sub: Any) -> None:
    """`taopd diagnose`: the fixed-context diagnostic."""
    p = sub.add_parser(
        "diagnose",
        help="fixed-context diagnostic: which tokens' losses help",
        description="Freeze a bank of student rollouts on held-out prompts, update "
        "the student (short OPD run or single steps), and relate each position's "
        "gain KL(p_T||p_θ0) - KL(p_T||p_θτ) to its signals (matched top-N, "
        "regressions, correlations, plots, report.html).",
    )
    _add_config_args(p)
    p.add_argument(
        "--mode",
        choices=["opd", "single-step"],
        help="update: a short OPD run (default) or one SGD step per position",
    )
    p.add_argument("--bank", help="reuse this bank.pt instead of sampling a new bank")
    gain = p.add_mutually_exclusive_group()
    gain.add_argument(
        "--relative",
        action="store_true",
        help="analyse the released relative gain (KL0 - KLτ)/KL0 (the default)",
    )
    gain.add_argument(
        "--absolute", action="store_true", help="analyse Eq. 1's absolute gain KL0 - KLτ"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing diagnostic")
    p.set_defaults(func=cmd_diagnose)


def _version() -> str:
    """The installed distribution's version (the package's own when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        return version("taopd")
    except PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taopd",
        description="Selective on-policy distillation by token teachability (arXiv 2605.26844).",
    )
    parser.add_argument("--version", action="version", version=f"taopd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo",
        help="the embedded CPU demo: SmolLM2 teacher -> student, offline",
        description="Fine-tune a SmolLM2 teacher on chain_sum (cached), then "
        "distill it into the untuned SmolLM2 with TA-OPD and print the result.",
    )
    _add_config_args(p, config=None, output_help="run folder (default runs/demo-<time>)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train",
        help="train a student with selective OPD from a YAML config",
        description="Run selective on-policy distillation as the config says.",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="greedy accuracy of a model on the task's test split",
        description="Evaluate a model (the config's student, a model folder or a "
        "checkpoint folder) on the config's task.",
    )
    _add_config_args(p, config="optional")
    p.add_argument("--model", help="model folder, checkpoint folder, hub id or 'smollm2'")
    p.add_argument("--n", type=int, help="number of test problems (default task.n_test)")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(func=cmd_eval)

    _add_compare(sub)
    _add_diagnose(sub)

    _add_pilot(sub)
    _add_report(sub)
    return parser


def _add_pilot(sub: Any) -> None:
    """`taopd pilot`: the first steps' KL spread of a config."""
    p = sub.add_parser(
        "pilot",
        help="does a setting leave room for selection? the first steps' KL spread",
        description="Run CONFIG's first step(s) in a scratch folder (nothing saved); print how "
        "the KL is spread and whether teachability and reverse-KL selection can differ.",
    )
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=1, help="steps to run (default 1)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_pilot)


def _add_report(sub: Any) -> None:
    """`taopd report`: the HTML page of a run folder."""
    p = sub.add_parser(
        "report",
        help="HTML report of a run folder",
        description="Write RUN_DIR/report.html: curves, tables, token view.",
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--signal",
        default="teachability",
        help="signal that colors the token view first: teachability (default), student_entropy, "
        "disagreement, compatibility, reverse_kl or none (the page can switch)",
    )
    p.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_deepspeed_notice()  # DeepSpeed's CPU notice, on runs that do not use it (errors.py)
    args = build_parser().parse_args(argv)
    if getattr(args, "no_progress", False):  # the libraries' bars too (loading weights, ...)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        return args.func(args)
    except UserError as e:
        step = sys.modules.get("taopd.training.step")  # not loaded: no run was stopped
        if step is not None and isinstance(e, step.RunStopped):  # as asked: not an error
            code = _stopped(args, e)
        else:
            print(f"taopd: error: {e}", file=sys.stderr)
            code = 2
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            # a multi-process run that failed (perhaps a peer died): tearing its process group
            # down could wait on that peer, and its threads race the shutdown (see
            # collectives.leave_process_group); everything kept is already on disk
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(code)
        return code
    except KeyboardInterrupt:
        print("taopd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

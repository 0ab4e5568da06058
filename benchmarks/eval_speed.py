#!/usr/bin/env python
"""`taopd eval` against the evaluation inside `taopd train`: the same model, the same problems.

Issue 33: `taopd eval` took ~30 s for 3 problems that the evaluation inside `taopd train` did in
~1 s. The cause was the thread count: `taopd train` sets torch's threads to the cores other jobs
leave free (`training.train.set_threads`), `taopd eval` generated with torch's default, one
thread per core; on a CPU shared with another job every parallel region then waits for the
thread on the busy core. `taopd eval` now sets its threads (and device) as `taopd train` does.

Rows, timed in this process one after the other on the same test problems (greedy, the
config's eval.batch_size and eval.max_new_tokens):

  train           Trainer.evaluate(), the accuracy `taopd train` measures before and after
  eval            `taopd eval` (cli.main) as it runs now
  eval, before    `taopd eval` with torch's default threads, as before the fix

"eval s" is the generation and scoring (`evaluate`'s own clock); "command s" the whole command
(model loading included; for train, only the evaluation call). `--busy K` runs K busy-loop
processes during the measurement, as other jobs on a shared CPU would, and first waits (up to
`--settle` seconds) for the 1-minute load average to show them, since `set_threads` reads it.

Usage:
  python benchmarks/eval_speed.py                                 # SmolLM2, 3 problems
  python benchmarks/eval_speed.py --busy 1 --n 3 --max-new-tokens 32
  python benchmarks/eval_speed.py --student S --teacher T --n 2   # tiny models (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import taopd.training.train as tr  # noqa: E402
from taopd.cli import main as taopd_main  # noqa: E402
from taopd.config import load_config  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # torch's own default, before anything sets it


def overrides(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        f"student={args.student}",
        f"teacher={args.teacher}",
        f"output_dir={out}",
        f"task.n_test={args.n}",
        f"eval.max_new_tokens={args.max_new_tokens}",
        "eval.heldout_kl_prompts=0",
        "train.batch_size=2",
        "train.report_to=none",
    ]


def time_train(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Trainer.evaluate() on a freshly set-up run (both models loaded, as `taopd train` does)."""
    torch.set_num_threads(DEFAULT_THREADS)
    cfg = load_config(None, overrides(args, work / "train-run"))
    trainer = tr.Trainer(cfg, progress=False)
    try:
        t = time.perf_counter()
        trainer.evaluate()
        seconds = time.perf_counter() - t
        n = len(trainer.evaluator.examples)
    finally:
        trainer.close()
    device = str(next(trainer.student.parameters()).device)
    return {"eval_s": seconds, "command_s": seconds, "n": n, "threads": trainer.threads,
            "device": device}  # fmt: skip


def time_eval(args: argparse.Namespace, work: Path, before: bool) -> dict[str, Any]:
    """`taopd eval` in this process; `before`: with torch's default threads (the old command)."""
    torch.set_num_threads(DEFAULT_THREADS)
    out = work / ("eval-before.json" if before else "eval.json")
    argv = ["eval", "--no-progress", "--json", str(out)]
    for o in overrides(args, work / "unused"):
        argv += ["--set", o]
    real = tr.set_threads
    if before:
        tr.set_threads = lambda threads, device: torch.get_num_threads()
    try:
        t = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            rc = taopd_main(argv)
        wall = time.perf_counter() - t
    finally:
        tr.set_threads = real
    if rc != 0:
        raise SystemExit(f"taopd eval failed ({rc})")
    res = json.loads(out.read_text())
    return {"eval_s": res["seconds"], "command_s": wall, "n": res["n"],
            "threads": res["threads"], "device": res["device"]}  # fmt: skip


@contextlib.contextmanager
def busy(k: int, settle: float) -> Iterator[None]:
    """K busy-loop processes for the block, after the load average has risen (or `settle` s)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    try:
        start = time.monotonic()
        while k and os.getloadavg()[0] < k - 0.5 and time.monotonic() - start < settle:
            time.sleep(2)
        yield
    finally:
        for p in procs:
            p.terminate()
            p.wait()


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    lines = [
        "| path | problems | threads | device | eval s | command s |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['n']} | {r['threads']} | {r['device']} | {r['eval_s']:.2f} | "
            f"{r['command_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--student", default="smollm2")
    p.add_argument("--teacher", default="smollm2")
    p.add_argument("--n", type=int, default=3, help="test problems (task.n_test)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="eval.max_new_tokens")
    p.add_argument("--busy", type=int, default=0, help="busy-loop processes during the runs")
    p.add_argument("--settle", type=float, default=90.0, help="seconds to wait for the load")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp, busy(args.busy, args.settle):
        work = Path(tmp)
        load = os.getloadavg()[0]
        rows = [
            ("train (Trainer.evaluate)", time_train(args, work)),
            ("taopd eval", time_eval(args, work, before=False)),
            ("taopd eval, before the fix", time_eval(args, work, before=True)),
        ]
    print(
        f"## eval speed: {args.student}, {args.max_new_tokens} new tokens, "
        f"{len(os.sched_getaffinity(0))} cores, torch default {DEFAULT_THREADS} threads, "
        f"load {load:.2f}, {args.busy} busy process(es)\n"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({name: r for name, r in rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

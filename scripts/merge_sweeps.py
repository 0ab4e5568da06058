"""One results table from arms of several `taopd compare` folders.

Each arm keeps the lr it ran at, so a table of "every arm at its own chosen lr" can be built
from sweeps that ran at different lrs (e.g. one arm chose 3e-5 on one grid, the others 1e-5 on a
wider grid) without rerunning anything. Copies each chosen arm's summary.json and metrics.jsonl
into OUT/arms/ and writes OUT/results.{csv,md} (means, 95% intervals, paired differences against
teachability), the learning curves and report.html, as `taopd compare --no-run` would.

    python scripts/merge_sweeps.py --output-dir OUT SWEEP:PATTERN [SWEEP:PATTERN ...]

PATTERN is a glob over the arm folders under SWEEP/arms/ (e.g. 'teachability-*-lr3e-05-s*').
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from taopd.errors import UserError
from taopd.experiments.arms import Arm
from taopd.experiments.compare import collect
from taopd.experiments.compare_tables import write_results
from taopd.training.run_dir import write_marker


def merge(out: Path, sources: list[tuple[Path, str]]) -> list[dict]:
    """Copy the finished arms matching each (sweep, pattern) into out/arms/, return their rows."""
    (out / "arms").mkdir(parents=True, exist_ok=True)
    write_marker(out, "compare")
    arms: list[Arm] = []
    for sweep, pattern in sources:
        found = sorted(p for p in (sweep / "arms").glob(pattern) if (p / "summary.json").exists())
        if not found:
            raise UserError(f"no finished arm matches {pattern!r} in {sweep / 'arms'}")
        for folder in found:
            arm = Arm.from_name(folder.name)
            if arm in arms:
                raise UserError(f"arm {folder.name} is given twice")
            dest = out / "arms" / folder.name
            dest.mkdir(exist_ok=True)
            for name in ("summary.json", "metrics.jsonl"):
                if (folder / name).exists():
                    shutil.copy2(folder / name, dest / name)
            arms.append(arm)
    rows = collect(out, arms)
    write_results(out, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("sources", nargs="+", help="SWEEP:PATTERN (a glob under SWEEP/arms/)")
    args = p.parse_args(argv)
    sources = []
    for item in args.sources:
        sweep, sep, pattern = item.partition(":")
        if not sep or not sweep:
            raise SystemExit(f"error: give SWEEP:PATTERN, got {item!r}")
        sources.append((Path(sweep), pattern))
    try:
        rows = merge(args.output_dir, sources)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(rows)} arms: {args.output_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The newcomer's walk (scripts/newcomer_walk.py, issue 33) end to end: the real `taopd` CLI
in subprocesses on the script's own JSONL and tiny model folders. A few CPU minutes: `-m slow`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_newcomer_walk_passes_every_step(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "newcomer_walk.py"), "--keep", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,  # about 2 CPU minutes; a CPU shared with other jobs stretches the wall time
    )
    out = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    assert "FAIL" not in proc.stdout, out
    assert proc.stdout.count("PASS ") >= 18, out  # every check ran

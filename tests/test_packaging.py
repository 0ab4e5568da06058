"""The wheel carries what the package reads at run time: recipes, accelerate configs, templates."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_templates(tmp_path):
    # build from a copy: a build/ folder left in the checkout would hide a missing entry
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("taopd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    pkg = ROOT / "src" / "taopd"
    wanted = [
        f"taopd/{p.relative_to(pkg).as_posix()}"
        for sub in ("configs", "reports/templates")
        for p in (pkg / sub).rglob("*")
        if p.is_file()
    ]
    assert any(w.endswith("demo.yaml") for w in wanted)
    assert any(w.endswith("accelerate/fsdp.yaml") for w in wanted)
    assert "taopd/integrations/trl.py" in names  # the `taopd[trl]` integration
    missing = [w for w in wanted if w not in names]
    assert not missing, f"not in the wheel: {missing}"

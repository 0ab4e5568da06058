"""mkdocs hook: regenerate the config reference before every build."""

import runpy
from pathlib import Path


def on_pre_build(config, **kwargs):
    runpy.run_path(
        str(Path(__file__).resolve().parents[1] / "scripts" / "config_reference.py"),
        run_name="__main__",
    )

"""The module paths of the flat layout, kept importable after the move into layer packages.

`taopd.scores`, `taopd.selection` and `taopd.loss` (the core a user imported) are shim files;
every other moved module (e.g. `taopd.train` -> `taopd.training.train`) is aliased by the finder
below. Each old path warns once with a DeprecationWarning naming the new one and is the new
module itself, so `mock.patch("taopd.train.X")` still patches what the trainer uses.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "alias", "install", "new_path"]

# old top-level name -> new dotted path under taopd (packages carry their submodules along)
MOVED = {
    "scores": "core.scores",
    "selection": "core.selection",
    "loss": "core.loss",
    "signal_names": "core.signal_names",
    "checkpoint": "training.checkpoint",
    "collectives": "training.collectives",
    "engines": "training.engines",
    "evaluate": "training.evaluate",
    "metrics": "training.metrics",
    "rollout": "training.rollout",
    "run_dir": "training.run_dir",
    "samples": "training.samples",
    "sampling": "training.sampling",
    "sft": "training.sft",
    "teacher_server": "training.teacher_server",
    "teachers": "training.teachers",
    "train": "training.train",
    "vllm_sampler": "training.vllm_sampler",
    "compare": "experiments.compare",
    "diagnose": "experiments.diagnose",
    "pilot": "experiments.pilot",
    "html_tables": "reports.html_tables",
    "report": "reports.report",
    "token_view": "reports.token_view",
}
SHIM_FILES = {"scores", "selection", "loss"}


def new_path(old: str) -> str | None:
    """The new dotted path of the old module path `old`, or None where it did not move."""
    parts = old.split(".")
    if len(parts) < 2 or parts[0] != "taopd" or parts[1] not in MOVED:
        return None
    return ".".join(["taopd", MOVED[parts[1]], *parts[2:]])


def alias(old: str) -> ModuleType:
    """Make the old module path `old` the moved module, with a DeprecationWarning."""
    new = new_path(old)
    assert new is not None, old
    warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[old] = module  # the import system hands out what sys.modules holds
    return module


class _Alias(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        alias(module.__name__)


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Answers only the old paths (first on sys.meta_path: a moved package's submodules would
    otherwise be found a second time under their old names)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # type: ignore[override]
        if new_path(fullname) is None or fullname.split(".")[1] in SHIM_FILES:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias())


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())

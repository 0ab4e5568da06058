"""The flat layout's old module paths still import, as the moved modules, with a
DeprecationWarning naming the new path; the public API and the entry point stay."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest

import taopd

PKG = Path(__file__).resolve().parents[1] / "src" / "taopd"


def test_public_api_and_entry_point_stay():
    for name in taopd.__all__:
        assert hasattr(taopd, name), name
    from taopd.cli import main  # the console script taopd = "taopd.cli:main"
    from taopd.integrations import trl  # noqa: F401 - the TRL integration's path

    assert callable(main)


@pytest.mark.parametrize("name", ["scores", "selection", "loss"])
def test_core_shims_warn_and_are_the_new_modules(name, monkeypatch):
    new = importlib.import_module(f"taopd.core.{name}")
    monkeypatch.delitem(sys.modules, f"taopd.{name}", raising=False)
    with pytest.warns(DeprecationWarning, match=rf"taopd\.{name} moved to taopd\.core\.{name}"):
        old = importlib.import_module(f"taopd.{name}")
    assert old is new
    assert (PKG / f"{name}.py").is_file()  # a real file: the path users imported


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("taopd.train", "taopd.training.train"),
        ("taopd.evaluate", "taopd.training.evaluate"),
        ("taopd.diagnose.bank", "taopd.experiments.diagnose.bank"),
        ("taopd.report", "taopd.reports.report"),
    ],
)
def test_moved_modules_alias_with_a_warning(old, new, monkeypatch):
    real = importlib.import_module(new)
    for key in [k for k in sys.modules if k == old or k.startswith(old + ".")]:
        monkeypatch.delitem(sys.modules, key)
    parent = old.rpartition(".")[0]
    if parent != "taopd":  # the alias of the old package too
        monkeypatch.delitem(sys.modules, parent, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is real
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module(new)  # the new path itself never warns


def test_the_package_attribute_of_an_old_core_path():
    with pytest.warns(DeprecationWarning, match="taopd.core.scores"):
        sys.modules.pop("taopd.scores", None)
        vars(taopd).pop("scores", None)
        assert taopd.scores is importlib.import_module("taopd.core.scores")

"""The package's layers (docs/layout.md) hold without import-linter: the import graph read from
the source (every import: top-level, in a function, under TYPE_CHECKING) has no circle, no
import runs up the layer table in pyproject.toml, and taopd.core imports only itself.
The public API is `from taopd import ...` and the entry point; the modules of the flat layout
(`taopd.scores`, `taopd.train`, ...) are gone, not aliased."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

import taopd

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "taopd"


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the taopd modules it imports (`from a import b` counts as a.b where b is one)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name)
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def _layers() -> tuple[list[list[str]], set[str]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    (contract,) = [c for c in cfg["importlinter"]["contracts"] if c["type"] == "layers"]
    layers = [[f"taopd.{s.strip()}" for s in layer.split("|")] for layer in contract["layers"]]
    return layers, {f"taopd.{m}" for m in contract.get("exhaustive_ignores", [])}


def _place(mod: str, layers: list[list[str]]) -> tuple[int, str] | None:
    for i, layer in enumerate(layers):
        for top in layer:
            if mod == top or mod.startswith(top + "."):
                return i, top
    return None


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_imports_follow_the_layers():
    layers, ignored = _layers()
    graph = import_graph()
    unplaced = [
        m for m in graph if m.count(".") == 1 and m not in ignored and _place(m, layers) is None
    ]
    assert not unplaced, f"modules in no layer of pyproject.toml: {unplaced}"
    wrong = []
    for mod, targets in graph.items():
        here = _place(mod, layers)
        for target in targets:
            there = _place(target, layers)
            if here is None or there is None or here[1] == there[1]:
                continue
            if there[0] <= here[0]:  # upward, or into an independent sibling
                wrong.append(f"{mod} -> {target}")
    assert not wrong, wrong


def test_core_imports_only_core():
    graph = import_graph()
    outside = {
        f"{m} -> {t}"
        for m, targets in graph.items()
        if m.startswith("taopd.core")
        for t in targets
        if not t.startswith("taopd.core")
    }
    assert not outside


def test_public_api_and_entry_point():
    for name in taopd.__all__:
        assert hasattr(taopd, name), name
    from taopd.cli import main  # the console script taopd = "taopd.cli:main"
    from taopd.integrations import trl  # noqa: F401 - the TRL integration's path

    assert callable(main)


@pytest.mark.parametrize("old", ["taopd.scores", "taopd.selection", "taopd.loss", "taopd.train"])
def test_the_flat_layouts_paths_are_gone(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)

"""The manual's code runs as written: every ```python block of the README and docs/ (with
pymdownx.snippets' `--8<-- "file"` includes expanded, as the site shows them) runs as a script
in a fresh folder, and fails the test if it fails. Pages whose code reads a run folder get one
first (docs/own-pair.md: its recipe trained for 2 steps on tiny local models). Also: the home
page is the README, the API page covers the public names, no page points outside the clone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import taopd
from tests.helpers import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SNIPPET = re.compile(r'^[ \t]*--8<--[ \t]+"([^"]+)"[ \t]*$', re.M)
OWN_PAIR = ROOT / "examples" / "own-pair"


def expand_snippets(text: str) -> str:
    """`--8<-- "path"` / `"path:start:end"` (1-based lines, inclusive) replaced by the file."""

    def include(m: re.Match) -> str:
        name, *lines = m.group(1).split(":")
        body = (ROOT / name).read_text(encoding="utf-8")
        if lines:
            start = int(lines[0] or 1)
            end = int(lines[1]) if len(lines) > 1 and lines[1] else None
            body = "\n".join(body.splitlines()[start - 1 : end]) + "\n"
        return body.rstrip("\n")

    return SNIPPET.sub(include, text)


def python_blocks() -> list:
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        blocks = re.findall(r"^```python[^\n]*\n(.*?)^```", text, re.S | re.M)
        for i, code in enumerate(blocks, 1):
            rel = page.relative_to(ROOT).as_posix()
            out.append(pytest.param(rel, expand_snippets(code), id=f"{rel}#{i}"))
    return out


BLOCKS = python_blocks()


def run_python(code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def own_pair_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/own-pair.md's folder: its recipe and data, two tiny local models where the recipe
    names them, trained 2 steps (a checkpoint after each) by the `taopd train` command."""
    here = tmp_path_factory.mktemp("own-pair")
    for name in ("my-pair.yaml", "my-task.jsonl"):
        shutil.copy(OWN_PAIR / name, here / name)
    make_tiny_model_dir(here / "models" / "my-student", seed=0)
    make_tiny_model_dir(here / "models" / "my-teacher", seed=1, hidden=48, layers=3)
    sets = ["train.steps=2", "train.save_every=1", "train.eval_every=0", "task.n_test=4"]
    argv = ["train", "my-pair.yaml", *(a for s in sets for a in ("--set", s))]
    res = run_python(f"from taopd.cli import main; main({argv!r})", here)
    assert res.returncode == 0, res.stderr[-3000:]
    return here


PREPARED = {"docs/own-pair.md": "own_pair_run"}  # page -> the fixture giving its folder


def test_the_manual_has_its_python_blocks():
    pages = {p.values[0] for p in BLOCKS}
    assert {"README.md", "docs/getting-started.md", "docs/trl.md", "docs/own-pair.md"} <= pages
    (trl,) = [p.values[1] for p in BLOCKS if p.values[0] == "docs/trl.md"]
    assert trl == (ROOT / "examples" / "trl_quickstart.py").read_text().rstrip("\n") + "\n"


@pytest.mark.parametrize("page,code", BLOCKS)
def test_every_python_block_runs(page, code, tmp_path, request):
    cwd = request.getfixturevalue(PREPARED[page]) if page in PREPARED else tmp_path
    res = run_python(code, cwd)
    assert res.returncode == 0, f"a Python block of {page} fails:\n{res.stderr[-3000:]}"


def test_a_failing_block_fails(tmp_path):
    res = run_python("import taopd\ntaopd.no_such_function()", tmp_path)
    assert res.returncode != 0 and "no_such_function" in res.stderr


def test_snippets_expand_as_the_site_shows_them(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "f.py").write_text("a\nb\nc\n")
    assert expand_snippets('x\n--8<-- "f.py"\ny') == "x\na\nb\nc\ny"
    assert expand_snippets('--8<-- "f.py:2:3"') == "b\nc"


def test_the_readme_trl_form_is_the_complete_script():
    """The README's short TRL form (a text block) is lines of examples/trl_quickstart.py, which
    the manual includes and the test above runs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use it from TRL", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```text\n(.*?)```", section, re.S)
    text = (ROOT / "examples" / "trl_quickstart.py").read_text(encoding="utf-8")
    script = {line.removesuffix("  # fmt: skip").rstrip() for line in text.splitlines()}
    missing = [line for line in block.splitlines() if line.strip() and line not in script]
    assert not missing, missing


def test_the_recipe_lands_where_the_page_says(own_pair_run):
    """Checkpoints at checkpoints/step-NNNNNN/{model/, trainer_state.pt}, keep_last of them;
    trainer_state.pt holds AdamW's two moments (2x the weights) and a little more."""
    ckpts = sorted((own_pair_run / "runs" / "my-pair" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000001", "step-000002"]
    model = ckpts[-1] / "model"
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()
    weights = (model / "model.safetensors").stat().st_size
    state = (ckpts[-1] / "trainer_state.pt").stat().st_size
    assert 2 * weights < state < 2 * weights + 200_000, (weights, state)


def test_the_own_pair_recipe_loads_and_sits_beside_its_data():
    from taopd.config import load_config

    cfg = load_config(OWN_PAIR / "my-pair.yaml")
    assert (OWN_PAIR / cfg.task.path).is_file()
    assert cfg.student.startswith("models/") and cfg.teacher.startswith("models/")


def test_the_home_page_is_the_readme():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    home = hooks.readme_as_home((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "](docs/" not in home and "](CHANGELOG.md)" not in home
    for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", home):
        assert (ROOT / "docs" / target).is_file(), target
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert re.fullmatch(r"<!--.*-->\s*", index, re.S), "docs/index.md only marks the place"


def test_the_api_page_covers_the_public_names_and_opens_with_the_calls():
    names = re.findall(r"^::: taopd\.(\w+)$", (ROOT / "docs" / "api.md").read_text(), re.M)
    assert sorted(names) == sorted(taopd.__all__)
    assert names[:3] == ["teachability", "select", "opd_loss"]


def test_no_file_points_outside_the_clone():
    """`../shared/` (the development workspace) does not exist in a clone."""
    roots = ["README.md", "docs", "examples", "scripts", "src", "benchmarks"]
    hits = []
    for root in roots:
        paths = [ROOT / root] if (ROOT / root).is_file() else (ROOT / root).rglob("*")
        for path in paths:
            if path.suffix not in {".md", ".py", ".yaml", ".yml", ".sh", ".txt"}:
                continue
            if path.is_file() and "../shared/" in path.read_text(errors="replace"):
                hits.append(path.relative_to(ROOT).as_posix())
    assert not hits, hits


def test_the_pages_split_rule_is_taopds():
    """docs/own-pair.md's split_of is the loader's hash rule, and its counts are the example's."""
    from taopd.data.tasks import FileTask

    (code,) = [p.values[1] for p in BLOCKS if "def split_of" in p.values[1]]
    page: dict = {}
    exec(code.split("\nwith open")[0], page)
    task = FileTask(OWN_PAIR / "my-task.jsonl")
    for side in ("train", "test"):
        assert all(page["split_of"](ex.entry["question"]) == side for ex in task._splits[side])
    n_train, n_test = len(task._splits["train"]), len(task._splits["test"])
    text = (ROOT / "docs" / "own-pair.md").read_text(encoding="utf-8")
    assert f"give {n_train} train and {n_test} test" in text
    assert "held-out problems evaluated" in (OWN_PAIR / "my-pair.yaml").read_text()

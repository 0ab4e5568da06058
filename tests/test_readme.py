import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _core_api_blocks():
    """Every copy of the core-API example (README and the manual's Getting started)."""
    for page in PAGES:
        for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            if "taopd.teachability(" in code and "taopd.select(" in code:
                yield pytest.param(page, code, id=page.relative_to(ROOT).as_posix())


@pytest.mark.parametrize("page,code", list(_core_api_blocks()))
def test_readme_api_example_runs_as_written(page, code, capsys):
    exec(compile(code, str(page), "exec"), {})
    out = capsys.readouterr().out
    assert "teachability:" in out
    kept = re.search(r"kept (\d+) of (\d+) positions", out)
    assert kept and int(kept.group(1)) == 13 and int(kept.group(2)) == 256  # ⌈0.05·256⌉


def test_core_api_example_is_in_readme_and_manual():
    pages = {p.name for p, _ in (x.values for x in _core_api_blocks())}
    assert {"README.md", "getting-started.md"} <= pages

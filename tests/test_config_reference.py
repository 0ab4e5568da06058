"""docs/reference/config.md: every field reachable from Config has a one-line meaning."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reference_script():
    """scripts/config_reference.py as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "scripts" / "config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_field_has_a_description():
    rows = reference_script().rows()
    assert len(rows) > 100  # the walk reached the nested sections
    missing = [key for _, key, _, _, desc in rows if not desc.strip()]
    assert not missing, (
        f"{len(missing)} config field(s) have no description (give each a `# comment` on its "
        f"line or just above it in src/taopd/config.py, or Field(description=...)): "
        + ", ".join(missing)
    )


def test_a_field_without_a_comment_reads_as_undescribed(tmp_path):
    """The check above can fail: a field with no comment gets an empty description."""
    src = tmp_path / "cfg.py"
    src.write_text(
        "class A:\n"
        "    x: int = 1  # on its line\n"
        "    # above it,\n"
        "    # over two lines\n"
        "    y: int = 2\n"
        "    z: int = 3\n"
    )
    found = reference_script().comment_descriptions(src)["A"]
    assert found == {"x": "on its line", "y": "above it, over two lines", "z": ""}


def test_each_section_is_one_table():
    """Top-level fields declared after the sections still land in the one `(top level)` table."""
    text = reference_script().render()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings)), headings
    top = text.split("## `(top level)`", 1)[1].split("\n## ", 1)[0]
    script = reference_script()
    assert script.code("output_dir", key=True) in top and script.code("student", key=True) in top


def test_the_reference_renders_cleanly():
    """Rendered as the manual renders it (Python-Markdown's tables; markdown comes with
    tensorboard): one row per field, no visible backslash before a pipe (`str | None`), and a
    field name wraps only after a dot."""
    import html
    import re

    import markdown

    script = reference_script()
    page = markdown.markdown(script.render(), extensions=["tables"])
    cells = re.findall(
        r"<tr>\s*<td>(.*?)</td>\s*<td>(.*?)</td>\s*<td>(.*?)</td>\s*<td>(.*?)</td>\s*</tr>",
        page,
        re.S,
    )
    fields = script.rows()
    order = list(dict.fromkeys(r[0] for r in fields))
    fields.sort(key=lambda r: order.index(r[0]))  # as rendered: one table per section
    assert len(cells) == len(fields)
    text = lambda cell: html.unescape(re.sub(r"<[^>]+>", "", cell))
    for (key_cell, type_cell, default_cell, _), (_, key, typ, default, _) in zip(cells, fields):
        assert (text(key_cell), text(type_cell), text(default_cell)) == (key, typ, default)
        assert re.fullmatch(r'<code class="cfg">[^<.]*(\.<wbr>[^<.]*)*</code>', key_cell), key_cell
    assert "\\|" not in page
    assert any(text(t) == "str | None" for _, t, _, _ in cells)


def test_text_cells_escape_pipes_only_outside_code():
    script = reference_script()
    assert script.text_cell("a | b, `x | y`") == "a \\| b, `x | y`"
    assert (
        script.code("a|b_*c.d", key=True) == '<code class="cfg">a&#124;b&#95;&#42;c.<wbr>d</code>'
    )

"""Write docs/reference/config.md from the pydantic classes in src/taopd/config.py.

A field's one-line meaning is its ``Field(description=...)`` if set, else the comment on its line
or the comment block right above it in config.py. Run by ``make docs`` (through the mkdocs hook
in docs/hooks.py), so the reference cannot drift from the code.
"""

from __future__ import annotations

import ast
import html
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PY = ROOT / "src" / "taopd" / "config.py"
OUT = ROOT / "docs" / "reference" / "config.md"


def comment_descriptions(path: Path = CONFIG_PY) -> dict[str, dict[str, str]]:
    """{class name: {field: description from comments, '' if none}}."""
    source = path.read_text()
    lines = source.splitlines()
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, str] = {}
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            line = lines[stmt.end_lineno - 1]
            text = ""
            if "  # " in line:
                text = line.split("  # ", 1)[1].strip()
            else:
                block, i = [], stmt.lineno - 2
                while i >= 0 and lines[i].strip().startswith("#"):
                    block.insert(0, lines[i].strip().lstrip("#").strip())
                    i -= 1
                text = " ".join(block)
            fields[stmt.target.id] = text
        out[node.name] = fields
    return out


def rows() -> list[tuple[str, str, str, str, str]]:
    """(section, field, type, default, description) for every field reachable from Config."""
    sys.path.insert(0, str(ROOT / "src"))
    from pydantic import BaseModel

    from taopd import config as cfg

    comments = comment_descriptions()
    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            ann = info.annotation
            key = f"{prefix}{name}"
            sub = [a for a in (typing.get_args(ann) or (ann,)) if isinstance(a, type)]
            sub = [a for a in sub if issubclass(a, BaseModel)]
            if sub:
                walk(sub[0], key + ".")
                continue
            desc = info.description or comments.get(model.__name__, {}).get(name, "")
            typ = ast.unparse(_annotation(model, name)) if _annotation(model, name) else str(ann)
            default = (
                "(required)"
                if info.is_required()
                else repr(info.get_default(call_default_factory=True))
            )
            out.append((prefix.rstrip(".") or "(top level)", key, typ, default, desc))

    walk(cfg.Config, "")
    return out


def _annotation(model: type, name: str) -> ast.expr | None:
    tree = ast.parse(CONFIG_PY.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == model.__name__:
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and getattr(stmt.target, "id", None) == name:
                    return stmt.annotation
    return None


def code(text: str, key: bool = False) -> str:
    """`text` as an HTML code span a Markdown table leaves alone: `|` and Markdown's own
    characters as entities (a `\\|` would show its backslash inside a code span). Class `cfg`
    (docs/stylesheets/extra.css) wraps only where a line may break; `key`: a field name, which
    may break after each dot."""
    out = html.escape(text, quote=False)
    for ch in "|_*`[]\\":
        out = out.replace(ch, f"&#{ord(ch)};")
    if key:
        out = out.replace(".", ".<wbr>")
    return f'<code class="cfg">{out}</code>'


def text_cell(text: str) -> str:
    """Markdown text for a table cell: `|` escaped outside code spans (inside one the table
    does not split, and a backslash would show)."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts)


def render() -> str:
    parts = [
        "# Config reference",
        "",
        "Generated from `src/taopd/config.py` by `scripts/config_reference.py` (do not edit).",
        "Set any field from the command line with `--set section.field=value`.",
    ]
    section = None
    all_rows = rows()
    order = list(dict.fromkeys(r[0] for r in all_rows))  # one section each, first-seen order
    for sec, key, typ, default, desc in sorted(all_rows, key=lambda r: order.index(r[0])):
        if sec != section:
            section = sec
            parts += [
                "",
                f"## `{sec}`",
                "",
                "| field | type | default | meaning |",
                "|---|---|---|---|",
            ]
        cells = [code(key, key=True), code(typ), code(default), text_cell(desc) or "—"]
        parts.append(f"| {' | '.join(cells)} |")
    return "\n".join(parts) + "\n"


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = render()
    if not OUT.exists() or OUT.read_text() != text:
        OUT.write_text(text)


if __name__ == "__main__":
    main()

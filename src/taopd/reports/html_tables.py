"""HTML for the report's tables: key/value and data tables, the diagnostic's JSON outputs
(matched top-n, regressions, correlations) and a comparison's results.md / results.csv.

Cells are escaped unless said otherwise; numbers are right-aligned.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "correlations_html",
    "csv_html",
    "esc",
    "fmt",
    "html_table",
    "is_finite",
    "kv_table",
    "markdown_html",
    "matched_topn_html",
    "regression_html",
]


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def is_finite(v: Any) -> bool:
    return _is_num(v) and math.isfinite(v)


def fmt(v: Any, floatfmt: str = ".4g") -> str:
    """A cell's text: None → '', floats by `floatfmt`, containers as compact JSON."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(v, floatfmt) if math.isfinite(v) else str(v)
    if isinstance(v, dict | list | tuple):
        return json.dumps(v, default=str)
    return str(v)


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def html_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], raw: bool = False) -> str:
    """A data table; cells are escaped (raw=True: cells are HTML already)."""
    head = "".join(f"<th>{c if raw else esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if _is_num(v) else ""
            text = v if raw and isinstance(v, str) else esc(fmt(v))
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="table-wrap"><table class="data"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _ci_cell(entry: Any, mean_key: str) -> tuple[str, bool]:
    """'mean [low, high]' text for a {mean, low, high} entry and whether the CI excludes 0."""
    if not isinstance(entry, dict):
        return esc(fmt(entry)), False
    m, lo, hi = entry.get(mean_key), entry.get("low"), entry.get("high")
    text = esc(fmt(m))
    if is_finite(lo) and is_finite(hi):
        text += f' <span class="ci">[{esc(fmt(lo))}, {esc(fmt(hi))}]</span>'
    excludes = is_finite(lo) and is_finite(hi) and (lo > 0 or hi < 0)
    return text, bool(excludes)


def _ratio_key(r: str) -> tuple[int, float, str]:
    try:
        return (0, float(r), r)
    except ValueError:
        return (1, 0.0, r)


def matched_topn_html(data: Any) -> str:
    if not isinstance(data, dict) or not data:
        return '<p class="note">matched_topn.json is empty or not an object.</p>'
    ratios: list[str] = []
    for per in data.values():
        if isinstance(per, dict):
            ratios += [str(r) for r in per if str(r) not in ratios]
    ratios.sort(key=_ratio_key)
    rows = []
    for selector, per in data.items():
        per = per if isinstance(per, dict) else {}
        per = {str(k): v for k, v in per.items()}
        cells = [esc(selector)]
        for r in ratios:
            entry = per.get(r)
            if entry is None:
                cells.append("")
                continue
            text, excl = _ci_cell(entry, "mean")
            n = entry.get("n") if isinstance(entry, dict) else None
            title = f' title="n = {esc(n)}"' if n is not None else ""
            cells.append(f"<span{title}>{'<b>' + text + '</b>' if excl else text}</span>")
        rows.append(cells)
    return (
        '<p class="note">Matched top-n: mean [low, high] per selector and retention ratio '
        "(bold where the interval excludes 0; hover a cell for n).</p>"
        + html_table(["selector"] + [f"ρ = {r}" for r in ratios], rows, raw=True)
    )


def regression_html(data: Any) -> str:
    if not isinstance(data, dict) or not data:
        return '<p class="note">regression.json is empty or not an object.</p>'
    out = [
        '<p class="note">Coefficients with confidence intervals (bold where the interval '
        "excludes 0).</p>"
    ]
    for model, coefs in data.items():
        out.append(f"<h3>{esc(model)}</h3>")
        if not isinstance(coefs, dict):
            out.append(f"<p>{esc(fmt(coefs))}</p>")
            continue
        extra: list[str] = []
        for entry in coefs.values():
            if isinstance(entry, dict):
                extra += [k for k in entry if k not in ("coef", "low", "high") and k not in extra]
        rows = []
        for name, entry in coefs.items():
            e = entry if isinstance(entry, dict) else {"coef": entry}
            _, excl = _ci_cell(e, "coef")
            cells = [esc(name)] + [esc(fmt(e.get(k))) for k in ("coef", "low", "high")]
            cells += [esc(fmt(e.get(k))) for k in extra]
            if excl:
                cells = [f"<b>{c}</b>" for c in cells]
            rows.append(cells)
        out.append(html_table(["coefficient", "coef", "low", "high", *extra], rows, raw=True))
    return "".join(out)


def correlations_html(data: Any) -> str:
    if not isinstance(data, dict) or not data:
        return '<p class="note">correlations.json is empty or not an object.</p>'
    keys: list[str] = []
    for entry in data.values():
        if isinstance(entry, dict):
            keys += [k for k in entry if k not in keys]
    lead = [k for k in ("spearman", "spearman_low", "spearman_high") if k in keys]
    keys = lead + [k for k in keys if k not in lead]
    rows = []
    for name, entry in data.items():
        e = entry if isinstance(entry, dict) else {"value": entry}
        rows.append([name] + [e.get(k) for k in keys])
    return (
        '<p class="note">Rank correlation of each signal with the per-position gain.</p>'
        + html_table(["signal", *keys], rows)
    )


def _inline_md(text: str) -> str:
    out = html.escape(text, quote=True)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _split_md_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def markdown_html(text: str) -> str:
    """Pipe tables, headings and paragraphs of a small Markdown file as HTML (escaped)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    sep = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
    while i < len(lines):
        line = lines[i]
        if "|" in line and i + 1 < len(lines) and sep.match(lines[i + 1]):
            header = _split_md_row(line)
            aligns = []
            for c in _split_md_row(lines[i + 1]):
                right = c.endswith(":") and not c.startswith(":")
                aligns.append(' class="num"' if right else "")
            i += 2
            body = []
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                cells = _split_md_row(lines[i])
                tds = []
                for j, c in enumerate(cells):
                    num = re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?%?", c)
                    cls = aligns[j] if j < len(aligns) and aligns[j] else ""
                    cls = ' class="num"' if num else cls
                    tds.append(f"<td{cls}>{_inline_md(c)}</td>")
                body.append("<tr>" + "".join(tds) + "</tr>")
                i += 1
            head = "".join(f"<th>{_inline_md(c)}</th>" for c in header)
            out.append(
                f'<div class="table-wrap"><table class="data"><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table></div>"
            )
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            out.append(f"<h3>{_inline_md(m.group(2))}</h3>")
        elif line.strip():
            out.append(f"<p>{_inline_md(line)}</p>")
        i += 1
    return "".join(out)


def csv_html(path: Path, notes: list[str]) -> str:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, csv.Error) as exc:
        notes.append(f"could not read {path.name}: {exc}")
        return ""
    if not rows:
        return '<p class="note">results.csv is empty.</p>'

    def num(c: str) -> Any:
        try:
            return int(c)
        except ValueError:
            try:
                return float(c)
            except ValueError:
                return c

    return html_table(rows[0], [[num(c) for c in r] for r in rows[1:]])

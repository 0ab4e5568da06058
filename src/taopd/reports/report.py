"""Plots and a self-contained HTML report (with the token view) for a run folder.

`render_report(run_dir)` reads whichever of these files the folder holds (all optional) and writes
one offline page, `run_dir/report.html`: no CDN, no external CSS/JS/fonts, images inlined as
base64 PNG, inline JS only (a Content-Security-Policy in the page forbids any network load).

- `summary.json`: a flat or nested object, shown as a key/value table at the top.
- `metrics.jsonl`: one object per line with `step` and any of the keys in `METRIC_GROUPS`
  (plus any other numeric key, drawn in the "other metrics" figures); curves go to
  `run_dir/plots/curve_*.png` and into the page, which lists any key left undrawn and why.
- `samples.jsonl`: the token view, one rollout per line:
  `{"step", "prompt", "answer", "correct", "tokens": [str], "selected": [bool],
  "signals": {name: [float]}, "student_top": [[[tok, prob], ...]], "teacher_top": ...}`.
- `matched_topn.json`, `regression.json`, `correlations.json` (from `taopd diagnose`),
  `results.md` / `results.csv` (from `taopd compare`), and any other `*.png` in `run_dir/plots/`
  or `run_dir/`: tables and images.
- `config.yaml`: shown verbatim.

The training curves are drawn by `curves.py` (matplotlib object API, Agg canvas, no pyplot
state), the tables by `html_tables.py`, the token view by `token_view.py`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from taopd.errors import UserError
from taopd.reports.curves import (
    CURVE_PREFIX,
    MAX_OTHER_PANELS,
    METRIC_GROUPS,
    Panel,
    plot_curves,
    unplotted,
)
from taopd.reports.html_tables import (
    correlations_html,
    csv_html,
    esc,
    fmt,
    html_table,
    is_finite,
    kv_table,
    markdown_html,
    matched_topn_html,
    regression_html,
)
from taopd.reports.token_view import token_view_data, token_view_html

__all__ = [
    "CURVE_PREFIX", "MAX_OTHER_PANELS", "METRIC_GROUPS", "Panel", "plot_curves", "render_report",
    "write_markdown_table",
]  # fmt: skip

_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


# ----------------------------------------------------------------------------- small helpers


def write_markdown_table(
    rows: list[dict[str, Any]], columns: list[str], floatfmt: str = ".4g"
) -> str:
    """A plain GitHub-style pipe table of `rows` restricted to `columns` (missing cells empty).

    Floats are formatted with `floatfmt`; '|' in cells is escaped and newlines become spaces.
    Ends with a newline.
    """
    if not columns:
        raise ValueError("write_markdown_table needs at least one column")

    def cell(v: Any) -> str:
        return fmt(v, floatfmt).replace("|", "\\|").replace("\r", " ").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"could not read {path.name}: {exc}")
        return None


def read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one per line; unreadable or malformed lines are skipped
    and counted in `notes` (a log cut short by a killed run still reads)."""
    records: list[dict[str, Any]] = []
    bad = 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        notes.append(f"could not read {path.name}: {exc}")
        return records
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(obj, dict):
            records.append(obj)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: skipped {bad} malformed line(s)")
    return records


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict) and obj:
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, obj)]


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# ----------------------------------------------------------------------------- tables


def _figures(paths: Sequence[Path], root: Path) -> str:
    out = []
    for p in paths:
        try:
            uri = _png_data_uri(p)
        except OSError:
            continue
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = p.name
        out.append(
            f'<figure class="plot"><img alt="{esc(p.stem)}" src="{uri}">'
            f"<figcaption>{esc(rel)}</figcaption></figure>"
        )
    return "".join(out)


def _last_values_table(metrics: list[dict[str, Any]]) -> str:
    last: dict[str, tuple[Any, Any, int]] = {}
    for r in metrics:
        for k, v in r.items():
            if k != "step" and is_finite(v):
                n = last[k][2] + 1 if k in last else 1
                last[k] = (v, r.get("step"), n)
    if not last:
        return ""
    rows = [[k, v, step, n] for k, (v, step, n) in last.items()]
    return "<h3>Last logged values</h3>" + html_table(
        ["metric", "last value", "at step", "points"], rows
    )


# ----------------------------------------------------------------------------- the page


def _template(name: str) -> str:
    return (resources.files("taopd.reports") / "templates" / name).read_text(encoding="utf-8")


Section = tuple[str, str, str]  # (id, title, html)


def render_report(
    run_dir: Path,
    signal: str = "teachability",
    out: Path | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write one self-contained HTML page for `run_dir` (default `run_dir/report.html`).

    Every input file is optional; missing ones drop their section. Metric curves are also saved
    as `run_dir/plots/curve_*.png`. `signal` picks the token view's initial colouring (the page
    has a drop-down to switch); when the samples lack it, the first signal they have is used.
    What the page notes (a skipped line, a signal it fell back from) is also appended to
    `notes` when given. Returns the path written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"report: run folder {run_dir} does not exist or is not a folder")
    out = Path(out) if out is not None else run_dir / "report.html"
    notes = [] if notes is None else notes
    sections: list[Section] = []
    blob: str | None = None
    sections += _summary_section(run_dir, notes)
    curves, made = _curves_section(run_dir, notes)
    sections += curves
    samples_path = run_dir / "samples.jsonl"
    if samples_path.is_file():
        samples = read_jsonl(samples_path, notes)
        if samples:
            body, blob = token_view_html(token_view_data(samples, signal, notes))
            sections.append(("tokens", "Token view", body))
    sections += _diagnostics_section(run_dir, notes)
    sections += _results_section(run_dir, notes)
    sections += _other_plots_section(run_dir, made, out)
    sections += _config_section(run_dir, notes)
    if not sections:
        notes.append(
            "no report inputs found (summary.json, metrics.jsonl, samples.jsonl, "
            "matched_topn.json, regression.json, correlations.json, results.md/.csv, "
            "config.yaml, plots/*.png)"
        )
    html_text = _page(run_dir, sections, notes, blob)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html_text, encoding="utf-8")
    return out


def _summary_section(run_dir: Path, notes: list[str]) -> list[Section]:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return []
    summary = _read_json(summary_path, notes)
    if summary is None:
        return []
    pairs = _flatten(summary) if isinstance(summary, dict) else [("summary", summary)]
    return [("summary", "Summary", kv_table(pairs))]


def _curves_section(run_dir: Path, notes: list[str]) -> tuple[list[Section], list[Path]]:
    """The metric curves (also saved under plots/) and the last logged values."""
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        return [], []
    metrics = [r for r in read_jsonl(metrics_path, notes) if is_finite(r.get("step"))]
    if not metrics:
        notes.append("metrics.jsonl has no records with a numeric step")
        return [], []
    made = plot_curves(metrics, run_dir / "plots")
    left = unplotted(metrics)
    skipped = (
        '<p class="note">Not plotted: '
        + "; ".join(f"<code>{esc(k)}</code> ({esc(why)})" for k, why in left)
        + ".</p>"
        if left
        else ""
    )
    body = _figures(made, run_dir) + skipped + _last_values_table(metrics)
    return [("curves", "Training curves", body)], made


def _diagnostics_section(run_dir: Path, notes: list[str]) -> list[Section]:
    diag = []
    for fname, title, fn in (
        ("matched_topn.json", "Matched top-n", matched_topn_html),
        ("regression.json", "Regression", regression_html),
        ("correlations.json", "Signal correlations", correlations_html),
    ):
        p = run_dir / fname
        if p.is_file():
            data = _read_json(p, notes)
            if data is not None:
                diag.append(f"<h3>{esc(title)} <small>({esc(fname)})</small></h3>" + fn(data))
    return [("diagnostics", "Diagnostics", "".join(diag))] if diag else []


def _results_section(run_dir: Path, notes: list[str]) -> list[Section]:
    md_path, csv_path = run_dir / "results.md", run_dir / "results.csv"
    if md_path.is_file():
        try:
            text = md_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            notes.append(f"could not read results.md: {exc}")
            return []
        return [("results", "Comparison results", markdown_html(text))]
    if csv_path.is_file():
        return [("results", "Comparison results", csv_html(csv_path, notes))]
    return []


def _other_plots_section(run_dir: Path, made: list[Path], out: Path) -> list[Section]:
    """Any other PNG in plots/ or the run folder (not the curves drawn here)."""
    plots_dir = run_dir / "plots"
    own = {p.resolve() for p in made}
    extra = []
    for folder in (plots_dir, run_dir):
        if folder.is_dir():
            for p in sorted(folder.glob("*.png")):
                if p.name.startswith(CURVE_PREFIX) and folder == plots_dir:
                    continue
                if p.resolve() in own or p.resolve() == out.resolve():
                    continue
                extra.append(p)
    return [("plots", "Other plots", _figures(extra, run_dir))] if extra else []


def _config_section(run_dir: Path, notes: list[str]) -> list[Section]:
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return []
    try:
        text = config_path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        notes.append(f"could not read config.yaml: {exc}")
        return []
    return [("config", "Config", f'<pre class="config">{esc(text)}</pre>')]


def _page(
    run_dir: Path, sections: list[tuple[str, str, str]], notes: list[str], blob: str | None
) -> str:
    title = f"taopd report — {run_dir.resolve().name}"
    toc = "".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t, _ in sections)
    note_html = "".join(f'<p class="note">⚠ {esc(n)}</p>' for n in notes)
    body = "".join(
        f'<section id="{sid}"><h2>{esc(t)}</h2>{content}</section>' for sid, t, content in sections
    )
    script = ""
    if blob is not None:
        script = (
            f'<script type="application/json" id="token-data">{blob}</script>'
            f"<script>{_template('report.js')}</script>"
        )
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_template('report.css')}</style></head>"
        f'<body><main><header class="top"><h1>{esc(title)}</h1>'
        f'<div class="meta">{esc(run_dir.resolve())} · generated {stamp}</div>'
        f'<nav class="toc">{toc}</nav></header>{note_html}{body}</main>{script}</body></html>\n'
    )

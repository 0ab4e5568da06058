"""Plots and a self-contained HTML report (with the token view) for a run folder.

`render_report(run_dir)` reads whichever of these files the folder holds (all optional) and writes
one offline page, `run_dir/report.html`: no CDN, no external CSS/JS/fonts, images inlined as
base64 PNG, inline JS only (a Content-Security-Policy in the page forbids any network load).

- `summary.json`: a flat or nested object, shown as a key/value table at the top.
- `metrics.jsonl`: one object per line with `step` and any of the keys in `METRIC_GROUPS`
  (plus any other numeric key, drawn in an "other metrics" figure); curves go to
  `run_dir/plots/curve_*.png` and into the page.
- `samples.jsonl`: the token view, one rollout per line:
  `{"step", "prompt", "answer", "correct", "tokens": [str], "selected": [bool],
  "signals": {name: [float]}, "student_top": [[[tok, prob], ...]], "teacher_top": ...}`.
- `matched_topn.json`, `regression.json`, `correlations.json` (from `taopd diagnose`),
  `results.md` / `results.csv` (from `taopd compare`), and any other `*.png` in `run_dir/plots/`
  or `run_dir/`: tables and images.
- `config.yaml`: shown verbatim.

Imports matplotlib (object API, Agg canvas, no pyplot state) and numpy only.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from taopd.errors import UserError

__all__ = ["render_report", "write_markdown_table", "plot_curves", "METRIC_GROUPS"]

# (file stem, title, panels); a panel is (title, x key, [(y key, label), ...]).
Panel = tuple[str, str, list[tuple[str, str]]]
METRIC_GROUPS: list[tuple[str, str, list[Panel]]] = [
    ("loss", "Training loss", [("loss", "step", [("loss", "loss")])]),
    (
        "kl",
        "Reverse KL: all valid tokens vs the selected ones",
        [
            ("training batch", "step", [("kl_all", "all tokens"), ("kl_selected", "selected")]),
            ("held-out", "step", [("heldout_kl", "held-out KL")]),
        ],
    ),
    (
        "signals",
        "Token signals: selected vs all",
        [
            (name, "step", [(f"{name}_all", "all tokens"), (f"{name}_selected", "selected")])
            for name in ("teachability", "entropy", "disagreement", "compatibility")
        ],
    ),
    (
        "selection",
        "Selection",
        [
            ("selected fraction", "step", [("selected_fraction", "selected fraction")]),
            ("selected tokens", "step", [("n_selected", "n selected")]),
            ("student/teacher top-K overlap", "step", [("overlap_all", "overlap (all)")]),
        ],
    ),
    (
        "accuracy",
        "Accuracy",
        [
            ("vs step", "step", [("accuracy", "accuracy")]),
            ("vs tokens trained", "tokens_trained", [("accuracy", "accuracy")]),
        ],
    ),
    (
        "throughput",
        "Throughput",
        [
            ("tokens / second", "step", [("tokens_per_second", "tokens/s")]),
            ("tokens trained (cumulative)", "step", [("tokens_trained", "tokens trained")]),
        ],
    ),
]
CURVE_PREFIX = "curve_"
MAX_SAMPLES = 40  # token view: evenly spaced subset of samples.jsonl beyond this
TOP_IN_TOOLTIP = 8  # candidates per side kept for the hover tooltip
MAX_OTHER_PANELS = 12
_STOPS = [(0.0, (255, 255, 255)), (0.5, (253, 174, 97)), (1.0, (215, 48, 39))]
_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


# ----------------------------------------------------------------------------- small helpers


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _is_num(v) and math.isfinite(v)


def _fmt(v: Any, floatfmt: str = ".4g") -> str:
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
        return _fmt(v, floatfmt).replace("|", "\\|").replace("\r", " ").replace("\n", " ")

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


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
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


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _colour(t: float) -> tuple[int, int, int]:
    """White → orange → red for t in [0, 1] (the same scale as the page's JS)."""
    t = min(1.0, max(0.0, t))
    for (t0, c0), (t1, c1) in zip(_STOPS, _STOPS[1:], strict=False):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            r, g, b = (round(a + f * (z - a)) for a, z in zip(c0, c1, strict=True))
            return r, g, b
    return _STOPS[-1][1]


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# ----------------------------------------------------------------------------- curves


def _series(
    metrics: Sequence[dict[str, Any]], x_key: str, y_key: str
) -> tuple[list[float], list[float]]:
    """(x, y) points of `y_key`; a missing `tokens_trained` x is interpolated from the steps."""
    lookup: tuple[list[float], list[float]] | None = None
    if x_key != "step":
        known = sorted(
            (float(r["step"]), float(r[x_key]))
            for r in metrics
            if _finite(r.get("step")) and _finite(r.get(x_key))
        )
        if known:
            lookup = ([a for a, _ in known], [b for _, b in known])
    xs: list[float] = []
    ys: list[float] = []
    for r in metrics:
        y = r.get(y_key)
        if not _finite(y):
            continue
        x = r.get(x_key)
        if not _finite(x):
            if lookup is None or not _finite(r.get("step")):
                continue
            import numpy as np

            step = float(r["step"])
            if step < lookup[0][0] or step > lookup[0][-1]:
                continue
            x = float(np.interp(step, lookup[0], lookup[1]))
        xs.append(float(x))
        ys.append(float(y))
    order = sorted(range(len(xs)), key=xs.__getitem__)
    return [xs[i] for i in order], [ys[i] for i in order]


def _ema(values: list[float], span: float) -> list[float]:
    alpha = 2.0 / (span + 1.0)
    out: list[float] = []
    acc = values[0]
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _draw(path: Path, title: str, panels: list[Panel], metrics: Sequence[dict[str, Any]]) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = []
    for p_title, x_key, lines in panels:
        data = [(label, *_series(metrics, x_key, y)) for y, label in lines]
        data = [d for d in data if d[1]]
        if data:
            drawn.append((p_title, x_key, data))
    if not drawn:
        return False
    ncols = 1 if len(drawn) == 1 else 2
    nrows = math.ceil(len(drawn) / ncols)
    fig = Figure(figsize=(5.4 * ncols if ncols > 1 else 8.0, 3.3 * nrows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    palette = ["#1f5fbf", "#d1492e", "#2b9348", "#7b4fb0"]
    for i, (p_title, x_key, data) in enumerate(drawn):
        ax = axes[i // ncols][i % ncols]
        for j, (label, xs, ys) in enumerate(data):
            c = palette[j % len(palette)]
            if len(xs) > 30:
                ax.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8)
                ax.plot(
                    xs,
                    _ema(ys, max(2.0, len(xs) / 20)),
                    color=c,
                    linewidth=1.6,
                    label=f"{label} (EMA)",
                )
            else:
                ax.plot(xs, ys, color=c, marker="o", markersize=3.5, linewidth=1.4, label=label)
        ax.set_title(p_title, fontsize=10)
        ax.set_xlabel(x_key.replace("_", " "), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        if len(data) > 1 or len(drawn) == 1:
            ax.legend(fontsize=8, frameon=False)
    for k in range(len(drawn), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    return True


def plot_curves(metrics: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Draw the `METRIC_GROUPS` figures (and one for any other numeric key) from metrics records.

    Writes `out_dir/curve_<group>.png` for each group with data and returns those paths in group
    order. Records without a finite value of a key are skipped for that key.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    known = {"step", "time", "epoch", "wall_time", "timestamp"}
    for stem, title, panels in METRIC_GROUPS:
        for _, x_key, lines in panels:
            known.add(x_key)
            known.update(y for y, _ in lines)
        path = out_dir / f"{CURVE_PREFIX}{stem}.png"
        if _draw(path, title, panels, metrics):
            written.append(path)
    others: list[str] = []
    for r in metrics:
        for k, v in r.items():
            if k not in known and k not in others and _finite(v):
                others.append(k)
    if others:
        if len(others) > MAX_OTHER_PANELS:
            warnings.warn(
                f"plot_curves: {len(others)} other metrics, drawing the first {MAX_OTHER_PANELS}",
                stacklevel=2,
            )
        panels = [(k, "step", [(k, k)]) for k in others[:MAX_OTHER_PANELS]]
        path = out_dir / f"{CURVE_PREFIX}other.png"
        if _draw(path, "Other metrics", panels, metrics):
            written.append(path)
    return written


# ----------------------------------------------------------------------------- token view


def _visible_html(token: str) -> str:
    """Escaped token text with whitespace made visible (· for space, ↵ + line break, → tab)."""
    marks = {" ": "·", "\t": "→", "\r": "␍", "\n": "↵"}
    out: list[str] = []
    for part in re.split(r"([ \t\r\n])", token):
        if part in marks:
            out.append(f'<span class="ws">{marks[part]}</span>')
            if part == "\n":
                out.append("<br>")
        elif part:
            out.append(html.escape(part, quote=True))
    return "".join(out) or '<span class="ws">∅</span>'


def _signal_stats(values: Iterable[float]) -> dict[str, float] | None:
    import numpy as np

    arr = np.asarray([v for v in values if _finite(v)], dtype=np.float64)
    if arr.size == 0:
        return None
    lo, hi = (float(q) for q in np.quantile(arr, [0.05, 0.95]))
    if hi - lo <= 1e-12:
        lo, hi = float(arr.min()), float(arr.max())
    return {"lo": lo, "hi": hi, "min": float(arr.min()), "max": float(arr.max())}


def _norm(v: float, st: dict[str, float]) -> float:
    span = st["hi"] - st["lo"]
    if span <= 0:
        return 1.0 if v > st["lo"] else 0.0
    return min(1.0, max(0.0, (v - st["lo"]) / span))


def _clean_tops(tops: Any, n: int) -> list[list[list[Any]] | None]:
    out: list[list[list[Any]] | None] = []
    rows = tops if isinstance(tops, list) else []
    for i in range(n):
        row = rows[i] if i < len(rows) else None
        if not isinstance(row, list):
            out.append(None)
            continue
        cands = []
        for c in row[:TOP_IN_TOOLTIP]:
            if isinstance(c, list | tuple) and len(c) >= 2 and _finite(c[1]):
                cands.append([str(c[0]), round(float(c[1]), 5)])
        out.append(cands)
    return out


def _pick_samples(samples: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    if len(samples) <= limit:
        return samples
    idx = sorted({round(i * (len(samples) - 1) / (limit - 1)) for i in range(limit)})
    return [samples[i] for i in idx]


def _json_for_script(obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _token_view(
    samples_all: list[dict[str, Any]], signal: str, notes: list[str]
) -> tuple[str, str]:
    """(HTML of the token-view section, its JSON data blob)."""
    samples = [s for s in samples_all if isinstance(s.get("tokens"), list)]
    if len(samples) < len(samples_all):
        notes.append(f"samples.jsonl: {len(samples_all) - len(samples)} line(s) without tokens")
    shown = _pick_samples(samples, MAX_SAMPLES)
    names: list[str] = []
    for s in shown:
        sig = s.get("signals")
        if isinstance(sig, dict):
            names += [str(k) for k, v in sig.items() if isinstance(v, list) and str(k) not in names]

    def values(s: dict[str, Any], name: str, n: int) -> list[float | None]:
        raw = (s.get("signals") or {}).get(name)
        raw = raw if isinstance(raw, list) else []
        return [float(raw[i]) if i < len(raw) and _finite(raw[i]) else None for i in range(n)]

    stats: dict[str, dict[str, float]] = {}
    for name in names:
        st = _signal_stats(
            v for s in shown for v in values(s, name, len(s["tokens"])) if v is not None
        )
        if st is not None:
            stats[name] = st
    names = [n for n in names if n in stats]
    if names and signal not in names:
        fallback = names[0]
        notes.append(f"signal {signal!r} is not in samples.jsonl; colouring by {fallback!r}")
        warnings.warn(
            f"report: signal {signal!r} not in samples.jsonl (have {names}); using {fallback!r}",
            stacklevel=3,
        )
        signal = fallback
    if not names:
        signal = "none"
    attrs: dict[str, str] = {}
    for name in names:
        attr = "data-s-" + _slug(name)
        while attr in attrs.values():
            attr += "-"
        attrs[name] = attr

    parts: list[str] = []
    tokens_blob: list[list[str]] = []
    tops_blob: list[list[list[Any]]] = []
    for si, s in enumerate(shown):
        toks = [str(t) for t in s["tokens"]]
        n = len(toks)
        sel_raw = s.get("selected") if isinstance(s.get("selected"), list) else []
        selected = [bool(sel_raw[i]) if i < len(sel_raw) else False for i in range(n)]
        vals = {name: values(s, name, n) for name in names}
        st_tops = _clean_tops(s.get("student_top"), n)
        te_tops = _clean_tops(s.get("teacher_top"), n)
        tokens_blob.append(toks)
        tops_blob.append([[a, b] for a, b in zip(st_tops, te_tops, strict=True)])
        correct = s.get("correct")
        verdict = (
            '<span class="ok">✓ correct</span>'
            if correct is True
            else '<span class="bad">✗ wrong</span>'
            if correct is False
            else "<span>not graded</span>"
        )
        n_sel = sum(selected)
        head = [
            f"<b>sample {si + 1}</b>",
            f"step <b>{_esc(s.get('step', '?'))}</b>",
            verdict,
        ]
        if s.get("answer") is not None:
            head.append(f"answer <code>{_esc(s['answer'])}</code>")
        head.append(f"{n} tokens, {n_sel} selected ({(n_sel / n if n else 0):.0%})")
        spans: list[str] = []
        for i, tok in enumerate(toks):
            cls = "tok selected" if selected[i] else "tok"
            attr_txt = "".join(
                f' {attrs[name]}="{vals[name][i]:.6g}"'
                if vals[name][i] is not None
                else f' {attrs[name]}="nan"'
                for name in names
            )
            style = ""
            if signal in stats:
                v = vals[signal][i]
                if v is None:
                    cls += " missing"
                else:
                    t = _norm(v, stats[signal])
                    r, g, b = _colour(t)
                    style = f' style="background:rgb({r},{g},{b})' + (
                        ';color:#fff"' if t > 0.85 else '"'
                    )
            spans.append(
                f'<span class="{cls}" data-pos="{i}"{attr_txt}{style}>{_visible_html(tok)}</span>'
            )
        prompt = s.get("prompt")
        prompt_html = (
            f"<details><summary>prompt</summary><pre>{_esc(prompt)}</pre></details>"
            if prompt is not None
            else ""
        )
        parts.append(
            f'<div class="sample" data-sample="{si}"><div class="sample-head">'
            + " · ".join(head)
            + f'</div>{prompt_html}<div class="tokens">{"".join(spans)}</div></div>'
        )

    options = (
        "".join(
            f'<option value="{_esc(n)}"{" selected" if n == signal else ""}>{_esc(n)}</option>'
            for n in names
        )
        + f'<option value="none"{" selected" if signal == "none" else ""}>none</option>'
    )
    st0 = stats.get(signal)
    lo_txt = f"≤ {st0['lo']:.4g}" if st0 else ""
    hi_txt = f"≥ {st0['hi']:.4g}" if st0 else ""
    count = (
        f"showing {len(shown)} of {len(samples)} samples (evenly spaced)"
        if len(shown) < len(samples)
        else f"{len(shown)} sample(s)"
    )
    controls = (
        '<div class="tv-controls">'
        '<span><label for="signal-select">colour by </label>'
        f'<select id="signal-select">{options}</select></span>'
        '<span class="legend"><span id="legend-name">'
        f"{_esc(signal if st0 else 'no colouring')}</span>"
        f'<span id="legend-lo">{_esc(lo_txt)}</span><span class="bar"></span>'
        f'<span id="legend-hi">{_esc(hi_txt)}</span></span>'
        '<span class="legend"><span class="selkey">tok</span> selected for the loss</span>'
        '<span class="legend"><span class="miss"></span> no value</span>'
        "</div>"
    )
    section = (
        '<p class="note">Response tokens of student rollouts; the background is the chosen '
        "signal, normalized over the samples on this page as in Eq. 11 "
        "(clip((v − Q0.05) / (Q0.95 − Q0.05), 0, 1)); the blue underline marks tokens that "
        "got a loss. Hover a token for all its signals and the student's and teacher's top "
        f"candidates. <b>·</b> is a space, <b>↵</b> a newline. {_esc(count)}.</p>"
        + controls
        + f'<div id="token-view" data-signal="{_esc(signal)}">{"".join(parts)}</div>'
        + '<div id="tok-tip" role="tooltip"></div>'
    )
    blob = {
        "signals": names,
        "attrs": attrs,
        "stats": stats,
        "initial": signal,
        "tokens": tokens_blob,
        "tops": tops_blob,
    }
    return section, _json_for_script(blob)


# ----------------------------------------------------------------------------- tables


def _html_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], raw: bool = False) -> str:
    """A data table; cells are escaped (raw=True: cells are HTML already)."""
    head = "".join(f"<th>{c if raw else _esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if _is_num(v) else ""
            text = v if raw and isinstance(v, str) else _esc(_fmt(v))
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="table-wrap"><table class="data"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _ci_cell(entry: Any, mean_key: str) -> tuple[str, bool]:
    """'mean [low, high]' text for a {mean, low, high} entry and whether the CI excludes 0."""
    if not isinstance(entry, dict):
        return _esc(_fmt(entry)), False
    m, lo, hi = entry.get(mean_key), entry.get("low"), entry.get("high")
    text = _esc(_fmt(m))
    if _finite(lo) and _finite(hi):
        text += f' <span class="ci">[{_esc(_fmt(lo))}, {_esc(_fmt(hi))}]</span>'
    excludes = _finite(lo) and _finite(hi) and (lo > 0 or hi < 0)
    return text, bool(excludes)


def _ratio_key(r: str) -> tuple[int, float, str]:
    try:
        return (0, float(r), r)
    except ValueError:
        return (1, 0.0, r)


def _matched_topn_html(data: Any) -> str:
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
        cells = [_esc(selector)]
        for r in ratios:
            entry = per.get(r)
            if entry is None:
                cells.append("")
                continue
            text, excl = _ci_cell(entry, "mean")
            n = entry.get("n") if isinstance(entry, dict) else None
            title = f' title="n = {_esc(n)}"' if n is not None else ""
            cells.append(f"<span{title}>{'<b>' + text + '</b>' if excl else text}</span>")
        rows.append(cells)
    return (
        '<p class="note">Matched top-n: mean [low, high] per selector and retention ratio '
        "(bold where the interval excludes 0; hover a cell for n).</p>"
        + _html_table(["selector"] + [f"ρ = {r}" for r in ratios], rows, raw=True)
    )


def _regression_html(data: Any) -> str:
    if not isinstance(data, dict) or not data:
        return '<p class="note">regression.json is empty or not an object.</p>'
    out = [
        '<p class="note">Coefficients with confidence intervals (bold where the interval '
        "excludes 0).</p>"
    ]
    for model, coefs in data.items():
        out.append(f"<h3>{_esc(model)}</h3>")
        if not isinstance(coefs, dict):
            out.append(f"<p>{_esc(_fmt(coefs))}</p>")
            continue
        extra: list[str] = []
        for entry in coefs.values():
            if isinstance(entry, dict):
                extra += [k for k in entry if k not in ("coef", "low", "high") and k not in extra]
        rows = []
        for name, entry in coefs.items():
            e = entry if isinstance(entry, dict) else {"coef": entry}
            _, excl = _ci_cell(e, "coef")
            cells = [_esc(name)] + [_esc(_fmt(e.get(k))) for k in ("coef", "low", "high")]
            cells += [_esc(_fmt(e.get(k))) for k in extra]
            if excl:
                cells = [f"<b>{c}</b>" for c in cells]
            rows.append(cells)
        out.append(_html_table(["coefficient", "coef", "low", "high", *extra], rows, raw=True))
    return "".join(out)


def _correlations_html(data: Any) -> str:
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
        + _html_table(["signal", *keys], rows)
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


def _markdown_html(text: str) -> str:
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


def _csv_html(path: Path, notes: list[str]) -> str:
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

    return _html_table(rows[0], [[num(c) for c in r] for r in rows[1:]])


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
            f'<figure class="plot"><img alt="{_esc(p.stem)}" src="{uri}">'
            f"<figcaption>{_esc(rel)}</figcaption></figure>"
        )
    return "".join(out)


def _last_values_table(metrics: list[dict[str, Any]]) -> str:
    last: dict[str, tuple[Any, Any, int]] = {}
    for r in metrics:
        for k, v in r.items():
            if k != "step" and _finite(v):
                n = last[k][2] + 1 if k in last else 1
                last[k] = (v, r.get("step"), n)
    if not last:
        return ""
    rows = [[k, v, step, n] for k, (v, step, n) in last.items()]
    return "<h3>Last logged values</h3>" + _html_table(
        ["metric", "last value", "at step", "points"], rows
    )


# ----------------------------------------------------------------------------- the page


def _template(name: str) -> str:
    return (resources.files("taopd") / "templates" / name).read_text(encoding="utf-8")


def render_report(run_dir: Path, signal: str = "teachability", out: Path | None = None) -> Path:
    """Write one self-contained HTML page for `run_dir` (default `run_dir/report.html`).

    Every input file is optional; missing ones drop their section. Metric curves are also saved
    as `run_dir/plots/curve_*.png`. `signal` picks the token view's initial colouring (the page
    has a drop-down to switch); when the samples lack it, the first signal they have is used.
    Returns the path written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"report: run folder {run_dir} does not exist or is not a folder")
    out = Path(out) if out is not None else run_dir / "report.html"
    notes: list[str] = []
    sections: list[tuple[str, str, str]] = []  # (id, title, html)
    blob: str | None = None

    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = _read_json(summary_path, notes)
        if summary is not None:
            pairs = _flatten(summary) if isinstance(summary, dict) else [("summary", summary)]
            sections.append(("summary", "Summary", _kv_table(pairs)))

    metrics_path = run_dir / "metrics.jsonl"
    plots_dir = run_dir / "plots"
    made: list[Path] = []
    if metrics_path.is_file():
        metrics = [r for r in _read_jsonl(metrics_path, notes) if _finite(r.get("step"))]
        if metrics:
            made = plot_curves(metrics, plots_dir)
            body = _figures(made, run_dir) + _last_values_table(metrics)
            sections.append(("curves", "Training curves", body))
        else:
            notes.append("metrics.jsonl has no records with a numeric step")

    samples_path = run_dir / "samples.jsonl"
    if samples_path.is_file():
        samples = _read_jsonl(samples_path, notes)
        if samples:
            body, blob = _token_view(samples, signal, notes)
            sections.append(("tokens", "Token view", body))

    diag = []
    for fname, title, fn in (
        ("matched_topn.json", "Matched top-n", _matched_topn_html),
        ("regression.json", "Regression", _regression_html),
        ("correlations.json", "Signal correlations", _correlations_html),
    ):
        p = run_dir / fname
        if p.is_file():
            data = _read_json(p, notes)
            if data is not None:
                diag.append(f"<h3>{_esc(title)} <small>({_esc(fname)})</small></h3>" + fn(data))
    if diag:
        sections.append(("diagnostics", "Diagnostics", "".join(diag)))

    md_path, csv_path = run_dir / "results.md", run_dir / "results.csv"
    if md_path.is_file():
        try:
            sections.append(
                (
                    "results",
                    "Comparison results",
                    _markdown_html(md_path.read_text(encoding="utf-8", errors="replace")),
                )
            )
        except OSError as exc:
            notes.append(f"could not read results.md: {exc}")
    elif csv_path.is_file():
        sections.append(("results", "Comparison results", _csv_html(csv_path, notes)))

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
    if extra:
        sections.append(("plots", "Other plots", _figures(extra, run_dir)))

    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            text = config_path.read_text(encoding="utf-8", errors="replace")
            sections.append(("config", "Config", f'<pre class="config">{_esc(text)}</pre>'))
        except OSError as exc:
            notes.append(f"could not read config.yaml: {exc}")

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


def _page(
    run_dir: Path, sections: list[tuple[str, str, str]], notes: list[str], blob: str | None
) -> str:
    title = f"taopd report — {run_dir.resolve().name}"
    toc = "".join(f'<a href="#{sid}">{_esc(t)}</a>' for sid, t, _ in sections)
    note_html = "".join(f'<p class="note">⚠ {_esc(n)}</p>' for n in notes)
    body = "".join(
        f'<section id="{sid}"><h2>{_esc(t)}</h2>{content}</section>' for sid, t, content in sections
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
        f"<title>{_esc(title)}</title><style>{_template('report.css')}</style></head>"
        f'<body><main><header class="top"><h1>{_esc(title)}</h1>'
        f'<div class="meta">{_esc(run_dir.resolve())} · generated {stamp}</div>'
        f'<nav class="toc">{toc}</nav></header>{note_html}{body}</main>{script}</body></html>\n'
    )

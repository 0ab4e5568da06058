"""The report's token view: per response token, its signals, selection and top candidates.

`token_view_data` shapes samples.jsonl records (samples.py) into what the page shows: which
samples, which signals and their colour scale; `token_view_html` writes the section and the
JSON blob the page's script reads for tooltips and re-colouring.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.signal_names import SAMPLE_SIGNALS
from .html_tables import esc, is_finite

__all__ = ["SIGNAL_CHOICES", "TokenViewData", "token_view_data", "token_view_html"]

# what samples.jsonl records per token (training/samples.py), and "none" for no colouring
SIGNAL_CHOICES = ("teachability", *SAMPLE_SIGNALS, "none")

MAX_SAMPLES = 40  # token view: evenly spaced subset of samples.jsonl beyond this
TOP_IN_TOOLTIP = 8  # candidates per side kept for the hover tooltip
_STOPS = [(0.0, (255, 255, 255)), (0.5, (253, 174, 97)), (1.0, (215, 48, 39))]


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

    arr = np.asarray([v for v in values if is_finite(v)], dtype=np.float64)
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
            if isinstance(c, list | tuple) and len(c) >= 2 and is_finite(c[1]):
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


@dataclass
class SampleView:
    """One rollout as shown: its tokens, selection, signal values and top candidates."""

    record: dict[str, Any]  # the samples.jsonl line (step, prompt, answer, correct, ...)
    tokens: list[str]
    selected: list[bool]
    values: dict[str, list[float | None]]  # per signal name; None: no finite value
    tops: list[list[Any]]  # per token: [student candidates, teacher candidates]


@dataclass
class TokenViewData:
    """What the token view shows: the samples, the signals present and their colour scales."""

    samples: list[SampleView]
    n_total: int  # samples with tokens in samples.jsonl (more than shown beyond MAX_SAMPLES)
    names: list[str]  # signals with at least one finite value
    stats: dict[str, dict[str, float]]  # per signal: the Q0.05 / Q0.95 colour scale, min, max
    signal: str  # the initial colouring ("none" without signals)
    attrs: dict[str, str] = field(default_factory=dict)  # per signal: its HTML data attribute


def _values(s: dict[str, Any], name: str, n: int) -> list[float | None]:
    raw = (s.get("signals") or {}).get(name)
    raw = raw if isinstance(raw, list) else []
    return [float(raw[i]) if i < len(raw) and is_finite(raw[i]) else None for i in range(n)]


def token_view_data(
    samples_all: list[dict[str, Any]], signal: str, notes: list[str]
) -> TokenViewData:
    """Shape samples.jsonl records for the page; problems go to `notes` (among them a requested
    `signal` the samples lack, and the one that colours the view instead)."""
    samples = [s for s in samples_all if isinstance(s.get("tokens"), list)]
    if len(samples) < len(samples_all):
        notes.append(f"samples.jsonl: {len(samples_all) - len(samples)} line(s) without tokens")
    shown = _pick_samples(samples, MAX_SAMPLES)
    names: list[str] = []
    for s in shown:
        sig = s.get("signals")
        if isinstance(sig, dict):
            names += [str(k) for k, v in sig.items() if isinstance(v, list) and str(k) not in names]
    stats: dict[str, dict[str, float]] = {}
    for name in names:
        st = _signal_stats(
            v for s in shown for v in _values(s, name, len(s["tokens"])) if v is not None
        )
        if st is not None:
            stats[name] = st
    names = [n for n in names if n in stats]
    if names and signal not in names and signal != "none":  # "none": no colouring
        fallback = names[0]
        notes.append(
            f"signal {signal!r} is not in samples.jsonl (it has {', '.join(names)}); "
            f"colouring by {fallback!r}"
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
    views = []
    for s in shown:
        toks = [str(t) for t in s["tokens"]]
        n = len(toks)
        sel_raw = s.get("selected") if isinstance(s.get("selected"), list) else []
        st_tops = _clean_tops(s.get("student_top"), n)
        te_tops = _clean_tops(s.get("teacher_top"), n)
        views.append(
            SampleView(
                record=s,
                tokens=toks,
                selected=[bool(sel_raw[i]) if i < len(sel_raw) else False for i in range(n)],
                values={name: _values(s, name, n) for name in names},
                tops=[[a, b] for a, b in zip(st_tops, te_tops, strict=True)],
            )
        )
    return TokenViewData(views, len(samples), names, stats, signal, attrs)


def _token_span(view: TokenViewData, sample: SampleView, i: int) -> str:
    """One token: its signal values as data attributes, coloured by the initial signal."""
    cls = "tok selected" if sample.selected[i] else "tok"
    attr_txt = "".join(
        f' {view.attrs[name]}="{sample.values[name][i]:.6g}"'
        if sample.values[name][i] is not None
        else f' {view.attrs[name]}="nan"'
        for name in view.names
    )
    style = ""
    if view.signal in view.stats:
        v = sample.values[view.signal][i]
        if v is None:
            cls += " missing"
        else:
            t = _norm(v, view.stats[view.signal])
            r, g, b = _colour(t)
            style = f' style="background:rgb({r},{g},{b})' + (';color:#fff"' if t > 0.85 else '"')
    tok = _visible_html(sample.tokens[i])
    return f'<span class="{cls}" data-pos="{i}"{attr_txt}{style}>{tok}</span>'


def _ungraded_reason(record: dict[str, Any]) -> str:
    """Why a sample has no verdict (its `correct` is missing)."""
    if record.get("answer") is None:
        return "no reference answer recorded"
    return "no verdict recorded"


UNGRADED_NOTE = (
    "{n} of the {shown} samples shown are not graded: their samples.jsonl lines record no "
    "reference answer to score the rollout against. Training runs record the answer and the "
    "verdict of each rollout (scored as the task scores its evaluations); the diagnostic's bank "
    "samples, and samples.jsonl files written by an earlier taopd version, record neither."
)


def _sample_html(view: TokenViewData, si: int, sample: SampleView) -> str:
    s, n = sample.record, len(sample.tokens)
    correct = s.get("correct")
    verdict = (
        '<span class="ok">✓ correct</span>'
        if correct is True
        else '<span class="bad">✗ wrong</span>'
        if correct is False
        else f'<span class="ungraded">not graded ({esc(_ungraded_reason(s))})</span>'
    )
    n_sel = sum(sample.selected)
    head = [f"<b>sample {si + 1}</b>", f"step <b>{esc(s.get('step', '?'))}</b>", verdict]
    if s.get("answer") is not None:
        head.append(f"answer <code>{esc(s['answer'])}</code>")
    head.append(f"{n} tokens, {n_sel} selected ({(n_sel / n if n else 0):.0%})")
    spans = [_token_span(view, sample, i) for i in range(n)]
    prompt = s.get("prompt")
    prompt_html = (
        f"<details><summary>prompt</summary><pre>{esc(prompt)}</pre></details>"
        if prompt is not None
        else ""
    )
    return (
        f'<div class="sample" data-sample="{si}"><div class="sample-head">'
        + " · ".join(head)
        + f'</div>{prompt_html}<div class="tokens">{"".join(spans)}</div></div>'
    )


def _controls(view: TokenViewData) -> str:
    """The colour-by drop-down and the legend."""
    signal = view.signal
    options = (
        "".join(
            f'<option value="{esc(n)}"{" selected" if n == signal else ""}>{esc(n)}</option>'
            for n in view.names
        )
        + f'<option value="none"{" selected" if signal == "none" else ""}>none</option>'
    )
    st0 = view.stats.get(signal)
    lo_txt = f"≤ {st0['lo']:.4g}" if st0 else ""
    hi_txt = f"≥ {st0['hi']:.4g}" if st0 else ""
    return (
        '<div class="tv-controls">'
        '<span><label for="signal-select">colour by </label>'
        f'<select id="signal-select">{options}</select></span>'
        '<span class="legend"><span id="legend-name">'
        f"{esc(signal if st0 else 'no colouring')}</span>"
        f'<span id="legend-lo">{esc(lo_txt)}</span><span class="bar"></span>'
        f'<span id="legend-hi">{esc(hi_txt)}</span></span>'
        '<span class="legend"><span class="selkey">tok</span> selected for the loss</span>'
        '<span class="legend"><span class="miss"></span> no value</span>'
        "</div>"
    )


def token_view_html(view: TokenViewData) -> tuple[str, str]:
    """(HTML of the token-view section, its JSON data blob for the page's script)."""
    parts = [_sample_html(view, si, s) for si, s in enumerate(view.samples)]
    shown = len(view.samples)
    count = (
        f"showing {shown} of {view.n_total} samples (evenly spaced)"
        if shown < view.n_total
        else f"{shown} sample(s)"
    )
    ungraded = sum(s.record.get("correct") not in (True, False) for s in view.samples)
    why = UNGRADED_NOTE.format(n=ungraded, shown=shown) if ungraded else ""
    section = (
        '<p class="note">Response tokens of student rollouts; the background is the chosen '
        "signal, normalized over the samples on this page as in Eq. 11 "
        "(clip((v − Q0.05) / (Q0.95 − Q0.05), 0, 1)); the blue underline marks tokens that "
        "got a loss. Hover a token for all its signals and the student's and teacher's top "
        f"candidates. <b>·</b> is a space, <b>↵</b> a newline. {esc(count)}.</p>"
        + (f'<p class="note">{esc(why)}</p>' if why else "")
        + _controls(view)
        + f'<div id="token-view" data-signal="{esc(view.signal)}">{"".join(parts)}</div>'
        + '<div id="tok-tip" role="tooltip"></div>'
    )
    blob = {
        "signals": view.names,
        "attrs": view.attrs,
        "stats": view.stats,
        "initial": view.signal,
        "tokens": [s.tokens for s in view.samples],
        "tops": [s.tops for s in view.samples],
    }
    return section, _json_for_script(blob)

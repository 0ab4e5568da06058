"""token_view.py: the token view's data (which samples, signals, colour scales) apart from HTML."""

from __future__ import annotations

import json

from taopd.reports.token_view import MAX_SAMPLES, token_view_data, token_view_html


def _record(step: int, values: list[float], selected: list[bool]) -> dict:
    return {
        "step": step,
        "tokens": ["a", " b", "\n"][: len(values)],
        "selected": selected,
        "signals": {"teachability": values, "reverse_kl": [float("nan")] * len(values)},
        "student_top": [[["a", 0.5], ["b", float("nan")]]] * len(values),
    }


def test_data_keeps_finite_signals_and_falls_back_with_a_note():
    notes: list[str] = []
    samples = [_record(1, [0.0, 1.0, 2.0], [True, False]), {"step": 2}]
    view = token_view_data(samples, "disagreement", notes)  # a note, not a Python warning
    assert view.names == ["teachability"]  # reverse_kl has no finite value: left out
    assert view.signal == "teachability" and view.n_total == 1
    assert any("without tokens" in n for n in notes) and any("colouring by" in n for n in notes)
    s = view.samples[0]
    assert s.selected == [True, False, False]  # missing entries are not selected
    assert s.values["teachability"] == [0.0, 1.0, 2.0]
    assert s.tops[0] == [[["a", 0.5]], None]  # non-finite candidates dropped; no teacher side
    st = view.stats["teachability"]
    assert st["min"] == 0.0 and st["max"] == 2.0 and st["lo"] < st["hi"]


def test_data_shows_an_evenly_spaced_subset():
    samples = [_record(i, [float(i)], [True]) for i in range(3 * MAX_SAMPLES)]
    view = token_view_data(samples, "teachability", [])
    steps = [s.record["step"] for s in view.samples]
    assert len(steps) == MAX_SAMPLES and steps[0] == 0 and steps[-1] == 3 * MAX_SAMPLES - 1


def test_html_carries_the_data():
    view = token_view_data([_record(5, [0.0, 1.0, 2.0], [True, True, False])], "teachability", [])
    section, blob = token_view_html(view)
    data = json.loads(blob)
    assert data["initial"] == "teachability" and data["tokens"] == [["a", " b", "\n"]]
    assert section.count('class="tok selected"') == 2 and "2 selected (67%)" in section
    assert 'data-s-teachability="2"' in section and "↵" in section


def test_ungraded_samples_say_why():
    graded = {**_record(1, [0.0, 1.0], [True, False]), "answer": "7", "correct": False}
    bare = _record(2, [0.5, 0.2], [False, True])  # no answer recorded (the diagnostic's bank)
    section, _ = token_view_html(token_view_data([graded, bare], "teachability", []))
    assert "✗ wrong" in section and "answer <code>7</code>" in section
    assert "not graded (no reference answer recorded)" in section
    assert "1 of the 2 samples shown are not graded: their samples.jsonl lines record" in section
    section, _ = token_view_html(token_view_data([graded], "teachability", []))
    assert "not graded" not in section

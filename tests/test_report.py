import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from taopd.errors import UserError
from taopd.reports.report import plot_curves, render_report, write_markdown_table

CHROMIUM = "/usr/bin/chromium"

SAMPLES = [
    {
        "step": 2,
        "prompt": "What is 6*7? <script>alert(1)</script>",
        "answer": "42",
        "correct": True,
        "tokens": ["The", " answer", " <", "b", ">", " &", "\n", "42"],
        "selected": [False, True, True, False, False, True, False, True],
        "signals": {
            "teachability": [0.0, 0.5, 0.9, 0.1, 0.2, 0.7, 0.0, 1.0],
            "student_entropy": [0.1, 1.2, 2.5, 0.3, 0.2, 1.9, 0.05, 0.4],
            "disagreement": [0.0, 0.3, 0.8, 0.05, 0.1, 0.6, 0.0, 0.9],
            "compatibility": [1.0, 0.9, 0.7, 0.95, 0.99, 0.8, 1.0, 0.85],
            "reverse_kl": [0.0, 0.2, 0.6, 0.01, 0.02, 0.5, 0.0, float("nan")],
        },
        "student_top": [[["The", 0.9], [" A", 0.05]]] * 8,
        "teacher_top": [[["The", 0.8], ["<b>", 0.1]]] * 8,
    },
    {
        "step": 4,
        "prompt": "x?",
        "answer": None,
        "correct": None,
        "tokens": ["x", " =", " 3", "\n", "<|im_end|>"],
        "selected": [True, False, False, False, True],
        "signals": {
            "teachability": [0.3, 0.0, 0.6, 0.0, 0.2],
            "student_entropy": [0.7, 0.2, 1.1, 0.1, 0.3],
        },
    },
]


def make_run(root: Path) -> Path:
    run = root / "run"
    run.mkdir()
    metrics = []
    for step in range(6):
        rec = {
            "step": step,
            "loss": 1.0 / (step + 1),
            "kl_all": 0.5 - 0.05 * step,
            "kl_selected": 0.8 - 0.07 * step,
            "selected_fraction": 0.2,
            "n_selected": 40,
            "teachability_all": 0.2,
            "teachability_selected": 0.6,
            "entropy_all": 0.9,
            "entropy_selected": 1.4,
            "tokens_per_second": 1000.0 + step,
            "tokens_trained": 200 * (step + 1),
            "grad_norm": 1.5,
            "my_metric": float(step),
            "kept_region_share": None,
        }
        metrics.append(rec)
        if step % 2 == 0:
            metrics.append({"step": step, "accuracy": 0.1 * step, "heldout_kl": 0.4})
    (run / "metrics.jsonl").write_text(
        "\n".join(json.dumps(m) for m in metrics) + "\nnot json\n", encoding="utf-8"
    )
    (run / "summary.json").write_text(
        json.dumps(
            {
                "final_accuracy": 0.4,
                "selector": "teachability",
                "ratio": 0.2,
                "model": {"student": "SmolLM2-135M"},
            }
        ),
        encoding="utf-8",
    )
    (run / "samples.jsonl").write_text(
        "\n".join(json.dumps(s) for s in SAMPLES) + "\n", encoding="utf-8"
    )
    (run / "config.yaml").write_text(
        "seed: 0\nurl_note: see https://example.org/docs\nstudent: a<b & c\n", encoding="utf-8"
    )
    (run / "matched_topn.json").write_text(
        json.dumps(
            {
                "teachability": {
                    "0.1": {"mean": 0.12, "low": 0.05, "high": 0.2, "n": 64},
                    "0.2": {"mean": 0.08, "low": -0.01, "high": 0.15, "n": 64},
                },
                "random": {"0.1": {"mean": 0.01, "low": -0.03, "high": 0.04, "n": 64}},
            }
        ),
        encoding="utf-8",
    )
    (run / "regression.json").write_text(
        json.dumps(
            {
                "ols": {
                    "D": {"coef": 0.5, "low": 0.3, "high": 0.7},
                    "C": {"coef": -0.1, "low": -0.4, "high": 0.2},
                },
            }
        ),
        encoding="utf-8",
    )
    (run / "correlations.json").write_text(
        json.dumps(
            {
                "teachability": {"spearman": 0.41, "spearman_low": 0.35, "spearman_high": 0.47},
            }
        ),
        encoding="utf-8",
    )
    (run / "results.md").write_text(
        "# sweep\n\n| selector | ratio | accuracy |\n|---|---:|---:|\n"
        "| teachability | 0.2 | **0.41** |\n| random | 0.2 | 0.33 |\n",
        encoding="utf-8",
    )
    return run


def external_refs(text: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//[^"'\s>]*""", text, re.I)


def test_write_markdown_table():
    rows = [{"a": 1, "b": 0.123456, "c": "x|y"}, {"a": None, "b": float("nan"), "c": "p\nq"}]
    text = write_markdown_table(rows, ["a", "b", "c"])
    assert text.splitlines() == [
        "| a | b | c |",
        "|---|---|---|",
        "| 1 | 0.1235 | x\\|y |",
        "|  | nan | p q |",
    ]


def test_plot_curves(tmp_path):
    metrics = [{"step": s, "loss": 1.0 / (s + 1), "lr": 1e-4, "mine": s} for s in range(40)]
    metrics.append({"step": 39, "accuracy": 0.5})
    paths = plot_curves(metrics, tmp_path / "plots")
    names = [p.name for p in paths]
    assert names == [
        "curve_loss.png", "curve_accuracy.png", "curve_optimization.png", "curve_other.png",
    ]  # fmt: skip
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_metric_the_trainer_logs_has_a_figure():
    """The keys a training step logs (and the evaluations add) all sit in METRIC_GROUPS, so
    none lands in "Other metrics" (issue 33: 12 of 34 metrics were drawn)."""
    from taopd.core.signal_names import METRIC_SIGNALS
    from taopd.reports.curves import METRIC_GROUPS, PHASES

    drawn = {y for _, _, panels in METRIC_GROUPS for _, _, lines in panels for y, _ in lines}
    logged = {f"{s.metric}_{w}" for s in METRIC_SIGNALS for w in ("all", "selected")}
    logged |= {"kl_sampled_all", "kl_sampled_selected", "overlap_all", "solved_share"}
    logged |= {"kl_top5_share", "kl_top5_incompatible", "top5_overlap", "compat_q05"}
    logged |= {"compat_q50", "compat_q95", "style_share_all", "style_share_selected"}
    logged |= {"style_share_kl_top5", "reverse_kl_style", "reverse_kl_other"}
    logged |= {"compatibility_style", "compatibility_other", "loss", "grad_norm", "lr"}
    logged |= {"n_selected", "n_valid", "tokens_trained", "response_length", "step_seconds"}
    logged |= {"kept_region_share", "tokens_per_second", "nonfinite_steps", "selected_fraction"}
    logged |= {"accuracy", "heldout_kl", "heldout_kl_style", "heldout_kl_other"}
    logged |= {f"{p}_{w}" for p in PHASES for w in ("seconds", "share")}
    assert logged - drawn == set()


def test_plot_curves_draws_every_numeric_key_without_a_warning(tmp_path):
    import warnings

    from taopd.reports.curves import MAX_OTHER_PANELS, unplotted

    keys = [f"m{i}" for i in range(2 * MAX_OTHER_PANELS + 3)]
    metrics = [{"step": s, **{k: float(s + i) for i, k in enumerate(keys)}} for s in range(3)]
    metrics[0].update(flag=True, empty=None, word="x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = plot_curves(metrics, tmp_path / "plots")
    assert [p.name for p in paths] == ["curve_other.png", "curve_other-2.png", "curve_other-3.png"]
    assert unplotted(metrics) == [
        ("flag", "a true/false flag, not a curve"),
        ("empty", "no finite value (null or NaN at every logged step)"),
        ("word", "not a number"),
    ]


def test_render_report(tmp_path):
    run = make_run(tmp_path)
    out = render_report(run)
    assert out == run / "report.html" and out.is_file()
    text = out.read_text(encoding="utf-8")
    assert external_refs(text) == []
    assert "<link" not in text and "@import" not in text
    # curves saved and embedded
    names = ("loss", "kl", "signals", "selection", "accuracy", "optimization", "throughput")
    for name in (*names, "other"):
        assert (run / "plots" / f"curve_{name}.png").is_file()
    assert text.count('src="data:image/png;base64,') == 8
    assert (
        "Not plotted: <code>kept_region_share</code> (no finite value (null or NaN at every "
        "logged step))." in text
    )
    # token view
    assert 'id="token-view"' in text
    n_tokens = sum(len(s["tokens"]) for s in SAMPLES)
    n_selected = sum(sum(s["selected"]) for s in SAMPLES)
    assert len(re.findall(r'<span class="tok[ "]', text)) == n_tokens
    assert len(re.findall(r'<span class="tok selected[ "]', text)) == n_selected
    assert 'data-s-teachability="0.9"' in text and 'data-s-student-entropy="2.5"' in text
    assert 'data-s-reverse-kl="nan"' in text
    # escaped text, visible whitespace
    view = text.split('id="token-view"', 1)[1].split('id="tok-tip"', 1)[0]
    assert "&lt;|im_end|&gt;" in view and "<|im_end|>" not in view
    assert '<span class="ws">·</span>&amp;' in view
    assert "↵" in view and "<br>" in view
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # the JSON blob cannot close its script tag
    blob = text.split('id="token-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in blob and "\\u003cb\\u003e" in blob
    data = json.loads(blob)
    assert data["signals"][:2] == ["teachability", "student_entropy"]
    assert data["tops"][0][0][1] == [["The", 0.8], ["<b>", 0.1]]
    # other sections
    assert "final_accuracy" in text and "model.student" in text
    assert "a&lt;b &amp; c" in text
    assert "<b>0.41</b>" in text and "ρ = 0.1" in text and "spearman_low" in text
    assert "skipped 1 malformed line" in text


def test_render_report_signal_and_empty(tmp_path):
    run = make_run(tmp_path)
    out = render_report(run, signal="student_entropy", out=tmp_path / "r.html")
    assert out == tmp_path / "r.html"
    assert 'data-signal="student_entropy"' in out.read_text(encoding="utf-8")
    notes: list[str] = []
    text = render_report(run, signal="nope", notes=notes).read_text(encoding="utf-8")
    assert 'data-signal="teachability"' in text
    fallback = "signal 'nope' is not in samples.jsonl (it has teachability, "
    assert any(n.startswith(fallback) for n in notes)
    assert "is not in samples.jsonl (it has teachability, " in text
    none = render_report(run, signal="none", notes=(notes := [])).read_text(encoding="utf-8")
    assert 'data-signal="none"' in none and not any("colouring by" in n for n in notes)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no report inputs found" in render_report(empty).read_text(encoding="utf-8")
    with pytest.raises(UserError):
        render_report(tmp_path / "missing")


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run(
        [CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_report_in_headless_chromium(tmp_path):
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMIUM)):
        if os.environ.get("TAOPD_REQUIRE_CHROMIUM"):  # CI installs it: a skip would hide a gap
            pytest.fail(f"{CHROMIUM} not installed (Debian package 'chromium')")
        pytest.skip(f"{CHROMIUM} not installed (Debian package 'chromium')")
    run = make_run(tmp_path)
    url = render_report(run).resolve().as_uri()
    dom = chromium(["--dump-dom", url + "#signal=student_entropy"], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="token-view"' in dom.stdout
    assert 'data-js="ready"' in dom.stdout, "the page's script did not run"
    assert 'data-signal="student_entropy"' in dom.stdout, "hash did not switch the signal"
    assert len(re.findall(r'<span class="tok[ "]', dom.stdout)) == 13
    shot = tmp_path / "shot.png"
    res = chromium(
        [f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars", url],
        tmp_path / "profile",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000


def test_cli_report_prints_notes_and_no_python_warning(tmp_path, capsys):
    """issue 33: `taopd report` printed a UserWarning with a source path; its notes are plain
    lines now, and every metric is drawn (no cap to warn about)."""
    import warnings

    from taopd.cli import main

    run = make_run(tmp_path)
    for i in range(30):  # more unknown metrics than one "Other metrics" figure holds
        with (run / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": 6, f"extra_{i}": 1.0}) + "\n")
    (run / "summary.json").write_text("{}")  # a run folder for check_report_folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["report", str(run)]) == 0
    assert [str(w.message) for w in caught] == []
    out = capsys.readouterr()
    assert "Warning" not in out.err and out.err == ""
    assert "note: metrics.jsonl: skipped 1 malformed line(s)" in out.out
    assert (run / "plots" / "curve_other-3.png").is_file()


def test_cli_report_refuses_an_unknown_signal(tmp_path, capsys):
    from taopd.cli import build_parser, main
    from taopd.reports.token_view import SIGNAL_CHOICES

    run = make_run(tmp_path)
    assert main(["report", str(run), "--signal", "teachabilty"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "taopd: error: --signal 'teachabilty' is not a token-view signal; use one of "
        "teachability, student_entropy, disagreement, compatibility, reverse_kl, none\n"
    )
    assert not (run / "report.html").exists()
    report = build_parser()._subparsers._group_actions[0].choices["report"]
    help_text = " ".join(report.format_help().split())
    assert all(name in help_text for name in SIGNAL_CHOICES)

"""The fixed-context diagnostic: recorded gains, single-step updates, statistics, the CLI."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from taopd.cli import main
from taopd.config import load_config
from taopd.core.loss import per_token_loss
from taopd.core.scores import token_signals
from taopd.experiments.diagnose import (
    INTERACTION_MODEL,
    REGRESSION_MODELS,
    SIGNAL_FIELDS,
    analysis_table,
    bootstrap_draws,
    correlations,
    load_bank,
    matched_count,
    matched_topn,
    rankdata,
    regressions,
    relative_gain,
    run_diagnose,
    single_step_gain,
    spearman,
    winsorize,
)
from taopd.models import load_model, position_ids


def tiny_diag_yaml(student: Path, teacher: Path, path: Path, **diagnose) -> Path:
    cfg = {
        "student": str(student),
        "teacher": str(teacher),
        "task": {"n_train": 64, "n_test": 8},
        "rollout": {"max_new_tokens": 5},
        "optim": {"lr": 3e-3},
        "train": {"steps": 2, "batch_size": 8, "tensorboard": False, "threads": 1},
        # the update from optim/train (null): the released 150 steps at 1e-6 are too slow here
        "diagnose": {
            "n_contexts": 12,
            "bootstrap": 20,
            "batch_size": 5,
            "update_lr": None,
            "update_steps": None,
            "update_batch_size": None,
            **diagnose,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_positions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def opd_run(tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diag")
    cfg = tiny_diag_yaml(
        tiny_model_dir, tiny_model_dir_same_tokenizer, root / "d.yaml", save_student=True
    )
    out = root / "run"
    assert main(["diagnose", str(cfg), "--output-dir", str(out), "--no-progress"]) == 0
    return out


def full_forward_kl(model, teacher, input_ids, att, p, vocab) -> torch.Tensor:
    """KL(p_T‖p_θ) at every response position from full [B, T, V] logits (the slow way)."""
    with torch.no_grad():
        pos = position_ids(att)
        s = model(input_ids=input_ids, attention_mask=att, position_ids=pos).logits
        t = teacher(input_ids=input_ids, attention_mask=att, position_ids=pos).logits
    ls = torch.log_softmax(s[:, p - 1 : -1, :vocab].double(), -1)
    lt = torch.log_softmax(t[:, p - 1 : -1, :vocab].double(), -1)
    return (lt.exp() * (lt - ls)).sum(-1)


# ----------------------------------------------------------------------------- (a) + (d)


def test_cli_writes_every_output(opd_run):
    out = opd_run
    for name in (
        "bank.pt",
        "positions.csv",
        "matched_topn.json",
        "regression.json",
        "correlations.json",
        "diagnose.md",
        "summary.json",
        "config.yaml",
        "report.html",
        "update/metrics.jsonl",
        "update/student/config.json",
    ):
        assert (out / name).is_file(), name
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"gain_by_decile.png", "coef_split.png", "learnable_vs_incompatible.png"} <= plots
    topn = json.loads((out / "matched_topn.json").read_text())
    assert set(topn) == {
        "teachability",
        "divergence",
        "reverse_kl",
        "incompatible",
        "tip",
        "entropy",
        "compatibility",
        "random",
        "early",
    }
    positions = read_positions(out / "positions.csv")
    n_pos = len(positions)
    rel = [float(r["relative_position"]) for r in positions]
    assert min(rel) == 0.0 and max(rel) < 1.0  # t / T_i of each bank context
    for per in topn.values():
        assert set(per) == {"0.03", "0.05", "0.1"}
        assert per["0.1"]["n"] == max(1, math.floor(0.1 * n_pos + 0.5))  # round(ρ·N)
        assert per["0.05"]["low"] <= per["0.05"]["high"]
        assert {"lift", "share_of_gain", "q3_fraction"} <= set(per["0.05"])
    other = json.loads((out / "matched_topn_absolute.json").read_text())
    assert set(other) == set(topn)
    reg = json.loads((out / "regression.json").read_text())
    # the released design: split = [H, D_L, D_I, pos, Ht], no H̃·D̃ term
    assert reg["split"].keys() == {"H", "D_L", "D_I", "pos", "Ht"}
    assert list(reg["base"]) == ["H", "D", "H*D", "pos", "Ht"]
    assert set(reg) == {"base", "+C", "split"}
    assert json.loads((out / "regression_absolute.json").read_text()).keys() == reg.keys()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gain_kind"] == "relative" and summary["divergence"] == "forward_kl"
    assert summary["regression_terms"]["split"] == ["H", "D_L", "D_I", "pos", "Ht"]
    corr = json.loads((out / "correlations.json").read_text())
    assert {"spearman", "spearman_low", "spearman_high"} <= set(corr["teachability"])
    page = (out / "report.html").read_text()
    assert "Matched top-n" in page and "Regression" in page
    # the token view: bank contexts at θ0, teachability's top 5% marked, colored by any signal
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(len(s["signals"]["gain"]) == len(s["tokens"]) for s in samples)
    n_spans = len(re.findall(r'class="tok[ "]', page))
    assert 'id="token-view"' in page and n_spans == sum(len(s["tokens"]) for s in samples)
    md = (out / "diagnose.md").read_text()
    assert "| teachability |" in md and "D_L" in md
    steps = [json.loads(x)["step"] for x in (out / "update/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the OPD update ran train.steps trainer steps


def test_recorded_gain_equals_direct_recomputation(
    opd_run, tiny_model_dir, tiny_model_dir_same_tokenizer
):
    """G_t = KL(p_T‖p_θ0) − KL(p_T‖p_θτ) from full logits of the two saved students."""
    bank, prompts, meta = load_bank(opd_run / "bank.pt")
    assert len(bank) == len(prompts) == meta["n_contexts"] == 12
    p = bank.prompt_len
    theta0 = load_model(str(tiny_model_dir))
    theta_tau = load_model(str(opd_run / "update" / "student"))
    teacher = load_model(str(tiny_model_dir_same_tokenizer))
    vocab = theta0.config.vocab_size  # the teacher's head has 7 padded rows more
    kl0 = full_forward_kl(theta0, teacher, bank.input_ids, bank.attention_mask, p, vocab)
    kl_tau = full_forward_kl(theta_tau, teacher, bank.input_ids, bank.attention_mask, p, vocab)
    rows = read_positions(opd_run / "positions.csv")
    valid = bank.response_mask[:, p:]
    assert len(rows) == int(valid.sum())
    gains = []
    for r in rows:
        b, j = int(r["prompt_id"]), int(r["position"])
        assert valid[b, j]
        assert float(r["kl0"]) == pytest.approx(float(kl0[b, j]), abs=1e-5, rel=1e-5)
        assert float(r["forward_kl"]) == pytest.approx(float(r["kl0"]))
        assert float(r["kl_tau"]) == pytest.approx(float(kl_tau[b, j]), abs=1e-5, rel=1e-5)
        direct = float(kl0[b, j] - kl_tau[b, j])
        assert float(r["gain_absolute"]) == pytest.approx(direct, abs=2e-5)
        k0, kt = float(r["kl0"]), float(r["kl_tau"])  # the released relative gain, the default
        assert float(r["gain_relative"]) == pytest.approx((k0 - kt) / (k0 + 1e-12), abs=1e-7)
        assert float(r["gain"]) == pytest.approx(float(r["gain_relative"]))
        gains.append(direct)
    assert max(abs(g) for g in gains) > 1e-3  # the update really moved the student


def test_single_step_mode_matches_a_manual_step(
    opd_run, tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path
):
    """Reusing the bank: each recorded single-step gain equals a by-hand SGD step on ℓ_t."""
    cfg_path = tiny_diag_yaml(
        tiny_model_dir,
        tiny_model_dir_same_tokenizer,
        tmp_path / "s.yaml",
        n_single=3,
        single_lr=0.05,
    )
    cfg = load_config(cfg_path, [f"output_dir={tmp_path / 'single'}"])
    s = run_diagnose(cfg, mode="single-step", bank_path=opd_run / "bank.pt", progress=False)
    assert s["mode"] == "single-step" and s["n_analysed"] == 3
    rows = [r for r in read_positions(tmp_path / "single" / "positions.csv") if r["gain"]]
    assert len(rows) == 3
    bank, _, _ = load_bank(tmp_path / "single" / "bank.pt")
    p = bank.prompt_len
    valid = bank.response_mask[:, p:]
    teacher = load_model(str(tiny_model_dir_same_tokenizer))
    r = rows[0]
    b, j = int(r["prompt_id"]), int(r["position"])
    model = load_model(str(tiny_model_dir))
    vocab = model.config.vocab_size
    ids, att = bank.input_ids, bank.attention_mask
    kl0 = full_forward_kl(model, teacher, ids, att, p, vocab)
    pos = position_ids(att)
    s_logits = model(
        input_ids=ids[b : b + 1], attention_mask=att[b : b + 1], position_ids=pos[b : b + 1]
    ).logits[0, p - 1 + j, :vocab]
    with torch.no_grad():
        t_logits = teacher(
            input_ids=ids[b : b + 1], attention_mask=att[b : b + 1], position_ids=pos[b : b + 1]
        ).logits[0, p - 1 + j, :vocab]
    per_token_loss(s_logits[None], t_logits[None], "reverse_kl").sum().backward()
    with torch.no_grad():
        for q in model.parameters():
            q -= 0.05 * q.grad
    kl_tau = full_forward_kl(model, teacher, ids, att, p, vocab)
    direct = float((kl0 - kl_tau)[valid].mean())
    assert float(r["gain_absolute"]) == pytest.approx(direct, abs=1e-5, rel=1e-3)
    assert float(r["gain_self"]) == pytest.approx(float(kl0[b, j] - kl_tau[b, j]), abs=1e-5)
    assert abs(direct) > 1e-6
    assert math.isfinite(float(r["first_order"]))


# ----------------------------------------------------------------------------- (b)


def _toy_gain(teacher_logits: torch.Tensor, student_logits: torch.Tensor, lr: float) -> float:
    """Single-step gain on one context of a 'model' whose logits are z0 + b (b learnable)."""
    bias = torch.zeros_like(student_logits, requires_grad=True)

    def step_loss() -> torch.Tensor:
        return per_token_loss((student_logits + bias)[None], teacher_logits[None]).sum()

    def fixed_kl() -> torch.Tensor:
        return per_token_loss(teacher_logits[None], (student_logits + bias)[None])  # KL(T‖θ)

    gains, _ = single_step_gain([bias], step_loss, fixed_kl, lr)
    assert torch.equal(bias, torch.zeros_like(bias))  # weights restored
    return float(gains[0])


@pytest.mark.parametrize("lr", [0.3, 1.0, 3.0])
def test_in_support_correction_gains_more_than_off_support(lr):
    """The teacher's preferred token inside the student's top-K (compatible) is learned from one
    reverse-KL step; the same correction outside the student's support barely moves (Eq. 10)."""
    vocab, k = 64, 4
    z0 = torch.full((vocab,), -2.0, dtype=torch.float64)
    z0[:k] = torch.tensor([4.0, 3.0, 2.5, 2.0])
    z0[40:] = -10.0  # tokens the student practically never samples
    t_in, t_off = z0.clone(), z0.clone()
    t_in[2] = 9.0  # teacher wants the student's 3rd candidate
    t_off[50] = 9.0  # teacher wants a token off the student's support
    sig = token_signals(torch.stack([z0, z0]), torch.stack([t_in, t_off]), k=k)
    assert sig.compatibility[0] > 0.9 > 0.1 > sig.compatibility[1]
    assert sig.forward_kl[1] > sig.forward_kl[0]  # off-support disagrees *more*
    g_in, g_off = _toy_gain(t_in, z0, lr), _toy_gain(t_off, z0, lr)
    assert g_in > 0
    assert g_in > 5 * abs(g_off)


# ----------------------------------------------------------------------------- (c)


def test_rankdata_and_spearman():
    assert rankdata(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    assert spearman(x, np.exp(3 * x) + 7) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)
    y = rng.normal(size=300)
    assert abs(spearman(x, y)) < 0.2
    assert math.isnan(spearman(x, np.ones(300)))


def test_bootstrap_draws_resample_whole_prompts():
    clusters = np.repeat(np.arange(5), [1, 2, 3, 4, 5])
    for idx in bootstrap_draws(clusters, 20, seed=1):
        picked = clusters[idx]
        for c in np.unique(picked):  # every drawn prompt comes with all of its positions
            assert (picked == c).sum() % (c + 1) == 0


def _synthetic(n_prompts=200, per=10, seed=0):
    rng = np.random.default_rng(seed)
    n = n_prompts * per
    raw = {name: rng.uniform(0, 1, n) for name in SIGNAL_FIELDS}
    raw["position"] = np.tile(np.arange(per), n_prompts).astype(float)
    return raw, np.repeat(np.arange(n_prompts), per), rng


def test_regression_recovers_the_learnable_vs_incompatible_ratio():
    raw, clusters, rng = _synthetic()
    n = len(clusters)
    d, c, h = rng.uniform(0, 1, n), rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    table = {
        "H": h,
        "D": d,
        "C": c,
        "H*D": h * d,
        "D_L": d * c,
        "D_I": d * (1 - c),
        "pos": raw["position"],
        "Ht": raw["teacher_entropy"],
    }
    gain = 2 * d * c + 1 * d * (1 - c) + rng.normal(0, 0.05, n)
    reg, r2 = regressions(table, gain, clusters, n_boot=100)
    split = reg["split"]
    assert split["D_L"]["coef"] / split["D_I"]["coef"] == pytest.approx(2.0, rel=0.1)
    for name, e in split.items():
        assert e["low"] <= e["coef"] <= e["high"], name
    assert split["D_L"]["low"] > split["D_I"]["high"]
    assert abs(split["H"]["coef"]) < 0.05 and split["H"]["low"] < 0 < split["H"]["high"]
    assert r2["split"] > 0.95 and r2["base"] < r2["split"]  # base lacks C
    assert reg["+C"]["C"]["coef"] > 0


def test_matched_topn_and_correlations_on_a_known_answer():
    raw, clusters, rng = _synthetic()
    table = analysis_table(raw)
    gain = table["teachability"] + rng.normal(0, 0.01, len(clusters))
    sels = ["teachability", "incompatible", "entropy", "random"]
    topn = matched_topn(table, gain, clusters, sels, [0.03, 0.05], n_boot=100)
    n = len(clusters)
    for sel in sels:
        for r, e in topn[sel].items():
            assert e["n"] == round(float(r) * n)
            assert e["low"] < e["high"]
    for e in topn["teachability"].values():  # a smooth top-N mean: the interval brackets it
        assert e["low"] <= e["mean"] <= e["high"]
    assert topn["teachability"]["0.03"]["low"] > topn["incompatible"]["0.03"]["high"]
    assert topn["teachability"]["0.03"]["low"] > topn["entropy"]["0.03"]["high"]
    rand = topn["random"]["0.05"]
    assert rand["low"] <= float(gain.mean()) <= rand["high"]
    corr = correlations(table, gain, clusters, ["teachability", "student_entropy"], n_boot=50)
    assert corr["teachability"]["spearman"] > 0.95
    e = corr["student_entropy"]
    assert e["spearman_low"] <= e["spearman"] <= e["spearman_high"]
    assert e["spearman_low"] < 0.1


def test_early_keeps_the_bank_positions_with_the_smallest_relative_position():
    raw, clusters, rng = _synthetic()
    raw["relative_position"] = rng.uniform(0, 1, len(clusters))
    table = analysis_table(raw)
    gain = 1.0 - raw["relative_position"]  # early positions gain most
    topn = matched_topn(table, gain, clusters, ["early", "random"], [0.05], n_boot=50)
    n = round(0.05 * len(clusters))
    best = np.sort(gain)[::-1][:n].mean()
    assert topn["early"]["0.05"]["mean"] == pytest.approx(best)
    assert topn["early"]["0.05"]["mean"] > topn["random"]["0.05"]["high"]


def test_split_model_without_the_interaction_term_gives_the_released_conclusion():
    """The released split fit has no H̃·D̃: with D_L + D_I = D̃, adding H̃·D̃ is nearly collinear
    with the split. On data whose gain follows 2·D^L + D^I the released design recovers ≈ 2×,
    and the interaction variant is only fitted when asked for, under its own name."""
    raw, clusters, rng = _synthetic(n_prompts=300)
    table = analysis_table(raw)
    gain = 2 * table["D_L"] + table["D_I"] + rng.normal(0, 0.02, len(clusters))
    reg, _ = regressions(table, gain, clusters, n_boot=50)
    assert "H*D" not in reg["split"] and "split+H*D" not in reg
    ratio = reg["split"]["D_L"]["coef"] / reg["split"]["D_I"]["coef"]
    assert 1.5 < ratio < 3.0
    both, _ = regressions(table, gain, clusters, {**REGRESSION_MODELS, **INTERACTION_MODEL}, 20)
    assert list(both["split+H*D"]) == ["H", "D_L", "D_I", "H*D", "pos", "Ht"]


def test_analysis_divergence_is_the_full_vocabulary_kl_by_default():
    raw, _, rng = _synthetic()
    raw["forward_kl"] = rng.exponential(1.0, len(raw["forward_kl"]))
    t = analysis_table(raw)
    assert np.array_equal(t["D_raw"], raw["forward_kl"])
    assert np.array_equal(analysis_table(raw, "union")["D_raw"], raw["disagreement"])
    assert t["D"].min() == 0 and t["D"].max() == 1  # Eq. 11 over the bank
    assert np.allclose(t["D_L"] + t["D_I"], t["D"])
    q3 = (t["H"] <= np.median(t["H"])) & (t["D"] >= np.median(t["D"]))
    assert np.array_equal(t["q3"].astype(bool), q3)
    # selectors rank by the same D: divergence's top positions are forward_kl's
    top = matched_topn(t, t["D"], np.arange(len(t["D"])), ["divergence"], [0.01], n_boot=0)
    n = round(0.01 * len(t["D"]))
    assert top["divergence"]["0.01"]["n"] == n
    # every kept position sits in forward_kl's clipped top (D̃ = 1: at or above its Q0.95)
    assert top["divergence"]["0.01"]["mean"] == pytest.approx(1.0)


def test_relative_gain_and_winsorization():
    kl0 = np.array([2.0, 1.0, 0.5, 1e-3])
    kl_tau = np.array([1.0, 1.0, 0.75, 0.0])
    assert np.allclose(relative_gain(kl0, kl_tau), [0.5, 0.0, -0.5, 1.0])
    x = np.concatenate([np.arange(100.0), [1e6, np.nan]])
    w = winsorize(x, 0.01)
    lo, hi = np.quantile(x[:101], [0.01, 0.99])
    assert w[:101].min() == pytest.approx(lo) and w[:101].max() == pytest.approx(hi)
    assert np.isnan(w[-1]) and w[50] == 50.0  # the middle untouched, NaN kept
    assert np.array_equal(winsorize(x[:101], 0.0), x[:101])
    with pytest.raises(ValueError):
        winsorize(x, 0.5)


def test_matched_count_is_round_half_up():
    assert [matched_count(0.05, n) for n in (10, 30, 50, 57600)] == [1, 2, 3, 2880]
    assert matched_count(0.001, 10) == 1 and matched_count(1.0, 7) == 7


def test_default_update_is_the_released_local_one(tmp_path):
    from taopd.experiments.diagnose import _update_config

    cfg = load_config("diagnose")
    upd = _update_config(cfg, tmp_path)
    assert (upd.optim.lr, upd.train.steps, upd.train.batch_size) == (1e-6, 150, 2)
    assert upd.selection.strategy == "full"
    old = load_config("diagnose", ["diagnose.update_lr=null", "diagnose.update_steps=null"])
    upd = _update_config(old, tmp_path)
    assert (upd.optim.lr, upd.train.steps) == (cfg.optim.lr, cfg.train.steps)


def test_gain_flags_choose_the_primary_gain():
    from taopd.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["diagnose", "diagnose", "--absolute"])
    assert args.absolute and not args.relative
    with pytest.raises(SystemExit):
        parser.parse_args(["diagnose", "diagnose", "--absolute", "--relative"])


def test_topn_by_kind_splits_the_selections():
    from taopd.experiments.diagnose.statistics import topn_by_kind

    raw, clusters, rng = _synthetic()
    table = analysis_table(raw)
    n = len(clusters)
    kinds = np.where(np.arange(n) % 10 == 0, "style", "other")  # one position in ten
    gain = np.where(kinds == "style", -1.0, 1.0) + rng.normal(0, 0.01, n)
    split = topn_by_kind(table, gain, kinds, ["teachability", "random"], [0.05, 0.1])
    assert split["bank"]["style_share"] == pytest.approx(0.1)
    assert split["bank"]["style"] == pytest.approx(-1.0, abs=0.01)
    for sel in ("teachability", "random"):
        for r, c in split[sel].items():
            assert c["n"] == round(float(r) * n)
            kept = c["style_share"]
            assert 0 <= kept <= 1
            # the kept mean is the style-weighted mix of the two kinds' kept means
            if c["gain_style"] is not None and c["gain_other"] is not None:
                assert c["gain_style"] == pytest.approx(-1.0, abs=0.05)
                assert c["gain_other"] == pytest.approx(1.0, abs=0.05)


def test_the_matched_topn_table_goes_once_to_the_trackers(
    tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path, monkeypatch
):
    """train.report_to [tensorboard, wandb]: matched_topn.json's means and lifts as scalars at
    step 0 (tb/ of the diagnostic's folder), and as a table in the wandb run (offline)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_trackers import wandb_history

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # wandb/ in the diagnostic's folder
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_diag_yaml(
        tiny_model_dir, tiny_model_dir_same_tokenizer, tmp_path / "d.yaml", ratios=[0.1, 0.3]
    )
    out = tmp_path / "diag"
    argv = ["diagnose", str(cfg), "--output-dir", str(out), "--no-progress"]
    argv += ["--set", "train.tensorboard=true", "--set", "train.report_to=[tensorboard,wandb]"]
    assert main(argv) == 0
    topn = json.loads((out / "matched_topn.json").read_text())
    want = {
        f"matched_topn/{sel}@{r}/{k}": e[k]
        for sel, per in topn.items()
        for r, e in per.items()
        for k in ("mean", "lift")
        if e.get(k) is not None and math.isfinite(e[k])
    }
    assert len(want) >= 2 * len(topn)
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = {t: acc.Scalars(t) for t in acc.Tags()["scalars"]}
    for key, value in want.items():
        (event,) = tb[key]  # once, at step 0
        assert event.step == 0 and math.isclose(event.value, value, rel_tol=1e-6, abs_tol=1e-7)
    assert "summary/gain_mean" in tb and not (out / "update" / "tb").exists()  # no update run
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    history, runs = wandb_history(run_file)
    assert list(history) == [0] and runs[0].display_name == "diag"
    assert history[0]["matched_topn/_type"] == "table-file"  # the table, beside its scalars
    table = json.loads((run_file.parent / "files" / history[0]["matched_topn/path"]).read_text())
    assert table["columns"][:4] == ["arm", "selector", "ratio", "n"]
    means = {row[0]: row[4] for row in table["data"]}
    assert (
        len(means) == 2 * len(topn)
        and means["teachability@0.1"] == topn["teachability"]["0.1"]["mean"]
    )
    for key, value in want.items():
        assert math.isclose(history[0][key], value, rel_tol=1e-9), key

"""taopd.integrations.trl: TA-OPD inside TRL 1.16's DistillationTrainer, on tiny random Llamas.

The integration must keep exactly the positions `taopd.select_tokens` keeps on the dense logits,
and TRL's loss must then be `taopd.opd_loss` over them (Eq. 7), for one or several micro-batches
and ranks. In selection_mode "weight" the batch must carry `taopd.core.weights.token_weights` of
the dense signals (of the global batch) and TRL's loss must be `opd_loss(..., token_weights=...)`
over every valid position."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl  # CI installs .[dev], which pins trl: these tests must run, never skip
from datasets import Dataset

import taopd
from taopd.core.weights import iw_opd_weights, token_weights
from taopd.integrations import trl as integ
from taopd.integrations import trl_weights
from tests import trl_helpers as th

ROOT = Path(__file__).resolve().parents[1]


def make_trainer(tmp_path: Path, cls=integ.TeachabilityDistillationTrainer, n_prompts=8, **kw):
    tok = th.word_tokenizer()
    return cls(
        model=th.tiny_llama(len(tok), 0),
        teacher_model=th.tiny_llama(len(tok), 1),
        args=th.config(tmp_path / "out", **kw),
        train_dataset=Dataset.from_dict({"prompt": th.prompts(n_prompts)}),
        processing_class=tok,
    )


def rows(prompts: list[str]) -> list[dict]:
    return [{"prompt": p} for p in prompts]


def reference(trainer, batch: dict, ratio: float, strategy: str = "teachability"):
    """Dense path: full logits of both models -> token_signals -> select_tokens -> opd_loss."""
    s_logits = th.dense_completion_logits(trainer.model, batch)
    with torch.no_grad():
        t_logits = th.dense_completion_logits(trainer.teacher_model, batch)
    valid = batch["completion_mask"].bool()
    sig = taopd.token_signals(s_logits.detach(), t_logits, k=trainer.args.selection_k, valid=valid)
    mask = taopd.select_tokens(sig, valid, strategy=strategy, ratio=ratio)
    return s_logits, t_logits, valid, mask


@pytest.mark.parametrize("strategy", ["teachability", "entropy", "early"])
def test_trl_loss_and_grads_equal_opd_loss_on_taopd_mask(tmp_path, strategy):
    trainer = make_trainer(tmp_path, selection_strategy=strategy)
    trainer.model.train()
    torch.manual_seed(3)
    batch = trainer._generate_and_score_completions(rows(th.prompts(8, seed=1)))
    s_logits, t_logits, valid, mask = reference(trainer, batch, 0.3, strategy)
    keep = batch["tool_mask"].bool()
    assert torch.equal(keep, mask)  # the same kept positions as taopd
    assert int(keep.sum()) == math.ceil(0.3 * int(valid.sum()))  # n = ⌈ρ·|I|⌉
    assert int(batch["num_items_in_batch"]) == int(keep.sum())
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, batch)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want_loss = taopd.opd_loss(s_logits, t_logits, mask, kind="reverse_kl")
    want = torch.autograd.grad(want_loss, params, allow_unused=True)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5, abs=1e-7)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or float(g.abs().max()) == 0.0
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    # the completion mask (and so the attention mask TRL builds from it) is untouched
    assert bool((batch["completion_mask"].bool() >= keep).all())
    assert int(batch["completion_mask"].sum()) == int(valid.sum())


@pytest.mark.parametrize("kw", [{}, {"selection_mode": "weight", "selection_ratio": None}])
def test_teacher_runs_once_per_step_when_cached(tmp_path, kw):
    trainer = make_trainer(tmp_path, **kw)
    trainer.model.train()
    calls = []
    hook = trainer.teacher_model.model.register_forward_hook(lambda *a: calls.append(1))
    batch = trainer._generate_and_score_completions(rows(th.prompts(4)))
    assert len(calls) == 1  # the scoring pass
    loss = trainer.compute_loss(trainer.model, batch)
    assert len(calls) == 1  # the loss reused its hidden states
    hook.remove()
    uncached = dict(batch)
    h_t = uncached.pop(integ._TEACHER_KEY)
    assert h_t.shape[:2] == batch["completion_ids"].shape
    assert float(trainer.compute_loss(trainer.model, uncached)) == pytest.approx(float(loss))


def test_gradient_accumulation_micro_batches_sum_to_whole_batch(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer.model.train()
    whole = {}
    real = trainer._generate_and_score_completions

    def keep_whole(inputs):
        whole.update(real(inputs))
        return whole

    trainer._generate_and_score_completions = keep_whole
    trainer._step, trainer._buffered_inputs = 0, None
    micro = []
    for step in range(2):
        trainer._step = step
        micro.append(trainer._prepare_inputs(rows(th.prompts(4, seed=2))))
    kept = int(whole["tool_mask"].sum())
    assert sum(int(m["tool_mask"].sum()) for m in micro) == kept
    assert all(int(m["num_items_in_batch"]) == kept for m in micro)  # the global normalizer
    parts = [float(trainer.compute_loss(trainer.model, m)) for m in micro]
    total = float(trainer.compute_loss(trainer.model, whole))
    assert sum(parts) == pytest.approx(total, rel=1e-5)
    _, _, _, mask = reference(trainer, whole, 0.3)
    assert torch.equal(whole["tool_mask"].bool(), mask)


def train_weights(tmp_path: Path, cls, **kw) -> dict[str, torch.Tensor]:
    trainer = make_trainer(tmp_path, cls=cls, max_steps=2, **kw)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_ratio_one_and_full_equal_vanilla_trl(tmp_path):
    class Vanilla(trl.DistillationTrainer):  # same args object type, TRL's own loss
        pass

    vanilla = train_weights(tmp_path / "v", Vanilla)
    for kw in ({"selection_ratio": 1.0}, {"selection_strategy": "full"}):
        ours = train_weights(tmp_path / "o", integ.TeachabilityDistillationTrainer, **kw)
        for name, w in vanilla.items():
            assert torch.equal(ours[name], w), (kw, name)
    selected = train_weights(tmp_path / "s", integ.TeachabilityDistillationTrainer)
    assert any(not torch.equal(selected[n], w) for n, w in vanilla.items())  # selection matters


def test_ratio_one_through_the_selection_path_equals_vanilla_loss(tmp_path):
    trainer = make_trainer(tmp_path, selection_ratio=1.0)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows(th.prompts(4)))
    assert "tool_mask" not in batch  # vanilla TRL batch
    selected = trainer._taopd_select(dict(batch))
    assert torch.equal(selected["tool_mask"].bool(), batch["completion_mask"].bool())
    assert int(selected["num_items_in_batch"]) == int(batch["num_items_in_batch"])
    a = trainer.compute_loss(trainer.model, batch)
    b = trainer.compute_loss(trainer.model, selected)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_existing_tool_mask_limits_the_valid_positions(tmp_path):
    trainer = make_trainer(tmp_path, selection_ratio=0.5)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows(th.prompts(4)))
    tool = torch.ones_like(batch["completion_mask"])
    tool[:, :2] = 0  # say the first two completion tokens came from a tool
    batch["tool_mask"] = tool
    out = trainer._taopd_select(dict(batch))
    valid = batch["completion_mask"].bool() & tool.bool()
    keep = out["tool_mask"].bool()
    assert not bool((keep & ~valid).any())
    assert int(keep.sum()) == math.ceil(0.5 * int(valid.sum()))


def test_train_logs_selection_metrics(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert 0 < h["taopd/kept_share"] < 1
        assert h["taopd/kept_positions"] >= 1
        for name in ("teachability", "disagreement", "compatibility", "topk_overlap"):
            assert f"taopd/{name}_kept" in h and f"taopd/{name}_all" in h
        assert h["taopd/teachability_kept"] >= h["taopd/teachability_all"]  # top-n by it


def test_config_validates_like_taopd_and_refusals(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"selection_ratio: ratio must be in \(0, 1\]"):
        th.config(tmp_path, selection_ratio=1.5)
    with pytest.raises(ValueError, match="selection_strategy: strategy must be one of"):
        th.config(tmp_path, selection_strategy="nope")
    with pytest.raises(ValueError, match="selection_k"):
        th.config(tmp_path, selection_k=0)
    with pytest.raises(ImportError, match=r"supports trl>=1.16,<1.17.*found trl 1.17.0"):
        integ.check_trl_version("1.17.0")
    integ.check_trl_version("1.16.3")
    with pytest.raises(TypeError, match="TeachabilityDistillationConfig"):
        tok = th.word_tokenizer()
        integ.TeachabilityDistillationTrainer(
            model=th.tiny_llama(len(tok), 0), teacher_model=th.tiny_llama(len(tok), 1),
            args=trl.DistillationConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False,
                                        report_to=[]),
            train_dataset=Dataset.from_dict({"prompt": th.prompts(4)}), processing_class=tok,
        )  # fmt: skip


def test_head_spec_reads_bias_scale_softcap_and_refuses_other_heads():
    tok = th.word_tokenizer()
    model = th.tiny_llama(len(tok), 0)
    assert integ.head_spec(model).is_plain
    model.config.logit_scale = 0.5
    model.config.final_logit_softcapping = 30.0
    spec = integ.head_spec(model)
    assert (spec.scale, spec.softcap) == (0.5, 30.0)

    class Odd(torch.nn.Linear):
        pass

    model.lm_head = Odd(16, len(tok))
    with pytest.raises(ValueError, match="lm_head of LlamaForCausalLM is a Odd"):
        integ.head_spec(model)


def test_selection_with_biased_scaled_softcapped_heads_equals_dense(tmp_path):
    trainer = make_trainer(tmp_path)
    for m, scale in ((trainer.model, 0.7), (trainer.teacher_model, 1.3)):
        old = m.lm_head
        m.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            m.lm_head.weight.copy_(old.weight)
            m.lm_head.bias.normal_(0, 1.0)
        m.config.logit_scale = scale
        m.config.final_logit_softcapping = 2.0
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows(th.prompts(6)))

    def dense(model):
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        c = batch["completion_ids"].size(1)
        h = model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, -c - 1 : -1]
        z = model.lm_head(h) * model.config.logit_scale
        return 2.0 * torch.tanh(z / 2.0)

    with torch.no_grad():
        s, t = dense(trainer.model), dense(trainer.teacher_model)
    valid = batch["completion_mask"].bool()
    sig = taopd.token_signals(s, t, k=4, valid=valid)
    assert torch.equal(batch["tool_mask"].bool(), taopd.select_tokens(sig, valid, ratio=0.3))


# -- the other rules: early, soft weights, IW-OPD ----------------------------------------------


def test_early_keeps_the_first_share_of_each_completion(tmp_path):
    trainer = make_trainer(tmp_path, selection_strategy="early", selection_scope="sequence",
                           selection_ratio=0.5)  # fmt: skip
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows(th.prompts(8, seed=1)))
    batch.pop("tool_mask")
    width = batch["completion_ids"].shape[1]
    lengths = torch.tensor([6, 5, 4, 3, 2, 1, 6, 3]).clamp_max(width)  # as if EOS came early
    valid = torch.arange(width) < lengths[:, None]
    batch["completion_mask"] = valid.to(batch["completion_mask"].dtype)
    out = trainer._taopd_select(dict(batch))
    first = torch.arange(width) < torch.ceil(0.5 * lengths)[:, None]  # first ⌈ρ·T_i⌉ each
    assert torch.equal(out["tool_mask"].bool(), first)
    assert int(out["num_items_in_batch"]) == int(first.sum())


def weight_reference(trainer, batch: dict):
    """Dense path of weight mode: full logits -> token_signals (with the sampled tokens) ->
    token_weights, over every valid position."""
    s_logits = th.dense_completion_logits(trainer.model, batch)
    with torch.no_grad():
        t_logits = th.dense_completion_logits(trainer.teacher_model, batch)
    valid = batch["completion_mask"].bool()
    args = trainer.args
    sig = taopd.token_signals(s_logits.detach(), t_logits, tokens=batch["completion_ids"],
                              k=args.selection_k, valid=valid)  # fmt: skip
    w = token_weights(sig, valid, args.selection_strategy, floor=args.selection_weight_floor,
                      gamma=args.selection_iw_gamma)  # fmt: skip
    return s_logits, t_logits, valid, w


def assert_same_loss_and_grads(trainer, loss, want_loss):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want = torch.autograd.grad(want_loss, params, allow_unused=True)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5, abs=1e-7)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or float(g.abs().max()) == 0.0
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("strategy", ["teachability", "iw_opd"])
def test_weight_mode_loss_and_grads_equal_weighted_opd_loss(tmp_path, strategy):
    trainer = make_trainer(tmp_path, selection_mode="weight", selection_strategy=strategy,
                           selection_ratio=None, selection_weight_floor=0.2,
                           selection_iw_gamma=0.7)  # fmt: skip
    assert trainer.args.selection_ratio == 1.0  # unset: 1 in weight mode
    trainer.model.train()
    torch.manual_seed(3)
    batch = trainer._generate_and_score_completions(rows(th.prompts(8, seed=1)))
    s_logits, t_logits, valid, w = weight_reference(trainer, batch)
    got_w = batch[trl_weights.WEIGHT_KEY]
    torch.testing.assert_close(got_w, w.to(got_w.dtype), rtol=1e-5, atol=1e-6)
    assert "tool_mask" not in batch  # every valid position is trained on
    assert int(batch["num_items_in_batch"]) == int(valid.sum())  # TRL's own normalizer
    if strategy == "iw_opd":
        ls, lt = torch.log_softmax(s_logits.detach(), -1), torch.log_softmax(t_logits, -1)
        idx = batch["completion_ids"][..., None]
        log_ratio = (ls.gather(-1, idx) - lt.gather(-1, idx)).squeeze(-1)
        want_w = iw_opd_weights(log_ratio, valid, gamma=0.7)
        torch.testing.assert_close(got_w, want_w.float(), rtol=1e-5, atol=1e-6)
        assert bool((got_w[valid] >= 1).all()) and bool((got_w[valid] <= 1.7 + 1e-6).all())
    else:
        assert float(got_w[valid].mean()) == pytest.approx(1.0, rel=1e-5)
        assert float(got_w[valid].std()) > 0.01  # the weights do vary
    assert trainer._metrics["train"]["taopd/weight_mean"][-1] == pytest.approx(
        float(got_w[valid].double().mean()), rel=1e-6
    )
    loss = trainer.compute_loss(trainer.model, batch)
    want_loss = taopd.opd_loss(s_logits, t_logits, valid, kind="reverse_kl", token_weights=w)
    assert_same_loss_and_grads(trainer, loss, want_loss)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_weights_of_one_give_trl_own_loss_for_every_beta(tmp_path, beta):
    """TRL's beta maps to taopd's loss kind (0 forward KL, 1 reverse KL, else the same JSD):
    with every weight 1 (floor 1) the weighted loss, its gradients and the entropy metric are
    TRL's own `_compute_loss` on the same batch."""
    trainer = make_trainer(tmp_path, selection_mode="weight", selection_ratio=1.0,
                           selection_weight_floor=1.0, beta=beta)  # fmt: skip
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows(th.prompts(6, seed=4)))
    valid = batch["completion_mask"].bool()
    assert torch.equal(batch[trl_weights.WEIGHT_KEY], valid.float())
    ours = trainer.compute_loss(trainer.model, batch)
    plain = {k: v for k, v in batch.items() if not k.startswith("taopd_")}
    theirs = trainer.compute_loss(trainer.model, plain)  # no weights: TRL's `_compute_loss`
    entropy = trainer._metrics["train"]["entropy"]
    assert entropy[-2] == pytest.approx(entropy[-1], rel=1e-5)
    assert_same_loss_and_grads(trainer, ours, theirs)


def test_weight_mode_refusals_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"selection_mode: selection mode 'weight' trains on every "
                       r"valid position.*selection_ratio=1.0, or leave it unset"):  # fmt: skip
        th.config(tmp_path, selection_mode="weight", selection_ratio=0.3)
    with pytest.raises(ValueError, match="selection_mode: strategy 'iw_opd' gives token weights, "
                       "not a ranking: use it with selection mode 'weight'"):  # fmt: skip
        th.config(tmp_path, selection_strategy="iw_opd")
    with pytest.raises(ValueError, match="strategy 'random' has no meaning as a weight"):
        th.config(tmp_path, selection_mode="weight", selection_ratio=None,
                  selection_strategy="random")  # fmt: skip
    with pytest.raises(ValueError, match="selection_mode"):
        th.config(tmp_path, selection_mode="soft")
    with pytest.raises(ValueError, match="selection_weight_floor"):
        th.config(tmp_path, selection_mode="weight", selection_ratio=1.0,
                  selection_weight_floor=1.5)  # fmt: skip
    with pytest.raises(ValueError, match="selection_iw_gamma"):
        th.config(tmp_path, selection_mode="weight", selection_ratio=1.0,
                  selection_strategy="iw_opd", selection_iw_gamma=-1.0)  # fmt: skip
    assert th.config(tmp_path, selection_ratio=None).selection_ratio == 0.05  # select's default
    assert trl_weights.loss_kind(0.25) == ("jsd", 0.25)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        trl_weights.loss_kind(1.5)


def test_gradient_accumulation_in_weight_mode_sums_to_whole_batch(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                           selection_mode="weight", selection_ratio=None)  # fmt: skip
    trainer.model.train()
    whole = {}
    real = trainer._generate_and_score_completions

    def keep_whole(inputs):
        whole.update(real(inputs))
        return whole

    trainer._generate_and_score_completions = keep_whole
    trainer._step, trainer._buffered_inputs = 0, None
    micro = []
    for step in range(2):
        trainer._step = step
        micro.append(trainer._prepare_inputs(rows(th.prompts(4, seed=2))))
    key, n_valid = trl_weights.WEIGHT_KEY, int(whole["completion_mask"].sum())
    assert sum(float(m[key].sum()) for m in micro) == pytest.approx(float(whole[key].sum()))
    assert all(int(m["num_items_in_batch"]) == n_valid for m in micro)  # the global normalizer
    parts = [trainer.compute_loss(trainer.model, m) for m in micro]
    total = trainer.compute_loss(trainer.model, whole)
    assert float(sum(parts)) == pytest.approx(float(total), rel=1e-5)
    _, _, _, w = weight_reference(trainer, whole)
    torch.testing.assert_close(whole[key], w.float(), rtol=1e-5, atol=1e-6)


def test_train_in_weight_mode_logs_weight_metrics(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, selection_mode="weight", selection_ratio=None,
                           selection_strategy="iw_opd")  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert math.isfinite(h["loss"]) and h["taopd/kept_share"] == 1.0
        assert 1.0 <= h["taopd/weight_min"] <= h["taopd/weight_max"] <= 1.5 + 1e-6
        assert "taopd/teachability_weighted" in h and "taopd/teachability_all" in h


def gloo_dense(ranks: list[dict]):
    """Each rank's recorded batch through the dense path: its signals and valid mask, padded
    to the widest rank, and the batch tensors."""
    tok = th.word_tokenizer()
    student, teacher = th.tiny_llama(len(tok), 0), th.tiny_llama(len(tok), 1)
    width = max(len(r["completion_ids"][0]) for r in ranks)
    sigs, valids, batches = [], [], []
    for r in ranks:
        batch = {k: torch.tensor(v) for k, v in r.items() if k != "num_items_in_batch"}
        with torch.no_grad():
            s = th.dense_completion_logits(student, batch)
            t = th.dense_completion_logits(teacher, batch)
        valid = batch["completion_mask"].bool()
        sig = taopd.token_signals(s, t, k=4, valid=valid)
        pad = width - valid.shape[1]
        sigs.append({n: torch.nn.functional.pad(x, (0, pad)) for n, x in sig.items()})
        valids.append(torch.nn.functional.pad(valid, (0, pad)))
        batches.append(batch)
    gathered = taopd.TokenSignals(**{n: torch.cat([s[n] for s in sigs]) for n in sigs[0]})
    return gathered, torch.cat(valids), batches, width


def test_two_gloo_processes_select_over_the_gathered_batch(tmp_path):
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate launcher not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [
        str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tests.trl_helpers",
        str(tmp_path),
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"select{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["prompt_ids"] != ranks[1]["prompt_ids"]  # each rank got its own prompts
    gathered, valid, batches, width = gloo_dense(ranks)
    pad = [width - b["tool_mask"].shape[1] for b in batches]
    masks = [torch.nn.functional.pad(b["tool_mask"].bool(), (0, p)) for b, p in zip(batches, pad)]
    want = taopd.select_tokens(gathered, valid, ratio=0.25)
    union = torch.cat(masks)
    assert torch.equal(union, want)
    assert int(union.sum()) == math.ceil(0.25 * int(valid.sum()))
    assert all(r["num_items_in_batch"] == int(union.sum()) for r in ranks)
    # weight mode: the weights are those of the gathered batch (mean 1 over it, not per rank)
    ranks = [json.loads((tmp_path / f"weight{r}.json").read_text()) for r in (0, 1)]
    gathered, valid, batches, width = gloo_dense(ranks)
    key = trl_weights.WEIGHT_KEY
    got = torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]))
                     for b in batches])  # fmt: skip
    torch.testing.assert_close(got, token_weights(gathered, valid).float(), rtol=1e-5, atol=1e-6)
    assert float(got[valid].mean()) == pytest.approx(1.0, rel=1e-5)
    per_rank = [float(b[key][b["completion_mask"].bool()].mean()) for b in batches]
    assert any(abs(m - 1.0) > 1e-3 for m in per_rank), per_rank  # so the scale is global
    assert all(r["num_items_in_batch"] == int(valid.sum()) for r in ranks)  # TRL's global count

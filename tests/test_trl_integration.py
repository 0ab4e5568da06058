"""taopd.integrations.trl: TA-OPD inside TRL 1.16's DistillationTrainer, on tiny random Llamas.

The integration must keep exactly the positions `taopd.select_tokens` keeps on the dense logits,
and TRL's loss must then be `taopd.opd_loss` over them (Eq. 7), for one or several micro-batches
and ranks."""

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
from taopd.integrations import trl as integ
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


@pytest.mark.parametrize("strategy", ["teachability", "entropy"])
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


def test_teacher_runs_once_per_step_when_cached(tmp_path):
    trainer = make_trainer(tmp_path)
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
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["prompt_ids"] != ranks[1]["prompt_ids"]  # each rank got its own prompts
    tok = th.word_tokenizer()
    student, teacher = th.tiny_llama(len(tok), 0), th.tiny_llama(len(tok), 1)
    sigs, valids, masks = [], [], []
    width = max(len(r["completion_ids"][0]) for r in ranks)
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
        masks.append(torch.nn.functional.pad(batch["tool_mask"].bool(), (0, pad)))
    gathered = taopd.TokenSignals(**{n: torch.cat([s[n] for s in sigs]) for n in sigs[0]})
    valid = torch.cat(valids)
    want = taopd.select_tokens(gathered, valid, ratio=0.25)
    union = torch.cat(masks)
    assert torch.equal(union, want)
    assert int(union.sum()) == math.ceil(0.25 * int(valid.sum()))
    assert all(r["num_items_in_batch"] == int(union.sum()) for r in ranks)

"""vllm_sampler.py on CPU without vLLM: error messages, and a fake `vllm` module that decodes with
the HF model, to check the Rollout layout, the per-call weight sync and the sampling parameters.
"""

from __future__ import annotations

import copy
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from taopd.config import VLLMCfg, load_config
from taopd.data import render_prompt
from taopd.errors import UserError
from taopd.models import lm_head, load_model, load_tokenizer
from taopd.training.rollout import Rollout, _generation_config, eos_token_ids, generate
from taopd.training.sampling import make_sampler
from taopd.training.vllm_sampler import VLLMSampler, sampling_kwargs, student_weights

EOS = 2
QUESTIONS = [
    "1 + 2 =",
    "State the final answer to the following arithmetic problem: 37 - 85 =",
    "9",
    "12 + 7 = 19",
    "The answer is",
    "alpha",
    "44 - 3 =",
    "Answer with only the number.",
]


# --------------------------------------------------------------------------------- fake vLLM


class FakeSamplingParams:
    """Records the keyword arguments it was built with (as attributes, like vllm's)."""

    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self.__dict__.update(kw)


class FakeWorkerModel:
    """What `apply_model` hands its function: an HF model with vLLM's `load_weights`."""

    def __init__(self, hf: torch.nn.Module) -> None:
        self.hf = hf
        self.loads: list[dict[str, torch.Tensor]] = []

    def load_weights(self, weights: Any) -> set[str]:
        got = {name: t.detach().clone() for name, t in weights}
        self.loads.append(got)
        self.hf.load_state_dict(got, strict=True)
        return set(got)


class FakeLLM:
    """`vllm.LLM` stand-in: loads the folder with HF and decodes each prompt on its own."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.model = FakeWorkerModel(load_model(kwargs["model"]))
        self.calls: list[tuple[list[dict], list[FakeSamplingParams]]] = []
        self.prefix_resets = 0
        self.events: list[str] = []
        FakeLLM.instances.append(self)

    def apply_model(self, fn: Any) -> list[Any]:
        self.events.append("apply_model")
        return [fn(self.model)]

    def reset_prefix_cache(self) -> bool:
        self.events.append("reset_prefix_cache")
        self.prefix_resets += 1
        return True

    def generate(self, prompts: list[dict], sampling_params: Any, use_tqdm: bool = True) -> list:
        self.events.append("generate")
        params = (
            list(sampling_params)
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompts)
        )
        assert len(params) == len(prompts)
        self.calls.append((prompts, params))
        hf, outs = self.model.hf, []
        for prompt, sp in zip(prompts, params):
            ids = torch.tensor([prompt["prompt_token_ids"]])
            greedy = sp.temperature == 0
            cfg = _generation_config(
                hf, sp.max_tokens, sp.temperature or 1.0, sp.top_p, greedy, sp.stop_token_ids, EOS
            )
            if sp.seed is not None:
                torch.manual_seed(sp.seed)
            with torch.no_grad():
                out = hf.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg
                )
            completion = types.SimpleNamespace(token_ids=out[0, ids.shape[1] :].tolist())
            outs.append(types.SimpleNamespace(outputs=[completion]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A fake `vllm` module in sys.modules (LLM, SamplingParams, TokensPrompt)."""
    mod = types.ModuleType("vllm")
    mod.LLM = FakeLLM
    mod.SamplingParams = FakeSamplingParams
    mod.TokensPrompt = lambda **kw: dict(kw)
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    return mod


@pytest.fixture
def tiny(tiny_model_dir: Path):
    """(a fresh student model, its tokenizer, chat prompts), eos made likelier.

    The eos row of lm_head is doubled so that some greedy rows end early and some run to the
    limit; the folder on disk keeps the original weights, so only a synced engine matches.
    """
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    with torch.no_grad():
        lm_head(model)[EOS] *= 2.0
    prompts = [render_prompt(tok, q) for q in QUESTIONS]
    return model, tok, prompts


def _assert_same_rollout(a: Rollout, b: Rollout) -> None:
    assert a.prompt_len == b.prompt_len
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.response_mask, b.response_mask)
    assert a.response_mask.dtype == b.response_mask.dtype == torch.bool
    assert a.texts == b.texts


# ------------------------------------------------------------------------------ make_sampler


def test_missing_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(UserError, match=r"needs the vllm extra.*pip install 'taopd\[vllm\]'"):
        make_sampler("vllm")
    assert make_sampler("hf") is generate


def test_no_cuda_is_a_clear_error(fake_vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"needs a CUDA GPU.*'hf'"):
        make_sampler("vllm", "smollm2")


def test_make_sampler_from_config_is_lazy(fake_vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(
        None, ["student=some/model", "rollout.backend=vllm", "rollout.vllm.dtype=bfloat16"]
    )
    sampler = make_sampler(cfg)
    assert isinstance(sampler, VLLMSampler)
    assert sampler.model_name == "some/model"
    assert sampler.cfg.dtype == "bfloat16"
    assert FakeLLM.instances == []  # no engine before the first call
    assert make_sampler(load_config(None, [])) is generate  # backend hf by default


def test_vllm_config_knobs_are_validated() -> None:
    cfg = load_config(None, [])
    assert cfg.rollout.vllm == VLLMCfg()
    assert cfg.rollout.vllm.gpu_memory_utilization == 0.3 and cfg.rollout.vllm.dtype == "auto"
    with pytest.raises(UserError, match="unknown key"):
        load_config(None, ["rollout.vllm.tensor_parallel=2"])
    with pytest.raises(UserError, match="gpu_memory_utilization"):
        load_config(None, ["rollout.vllm.gpu_memory_utilization=1.5"])
    with pytest.raises(UserError, match="max_model_len"):
        load_config(None, ["rollout.backend=vllm", "rollout.vllm.max_model_len=100"])
    load_config(None, ["rollout.backend=hf", "rollout.vllm.max_model_len=100"])  # unused: fine


# --------------------------------------------------------------------------- the fake engine


def test_greedy_rollout_equals_hf_generate(fake_vllm, tiny, tiny_model_dir: Path) -> None:
    model, tok, prompts = tiny
    ref = generate(model, tok, prompts, max_new_tokens=10, greedy=True)
    lengths = ref.response_lengths.tolist()
    assert min(lengths) < 10 and max(lengths) == 10  # both eos-ended and capped rows
    sampler = VLLMSampler(str(tiny_model_dir))
    roll = sampler(model, tok, prompts, max_new_tokens=10, greedy=True, batch_size=3, seed=5)
    _assert_same_rollout(roll, ref)
    (llm,) = FakeLLM.instances
    # prompts went in as token ids: the unpadded prompt block of generate's rollout
    requests, params = llm.calls[0]
    p = ref.prompt_len
    for i, req in enumerate(requests):
        real = ref.attention_mask[i, :p].bool()
        assert req["prompt_token_ids"] == ref.input_ids[i, :p][real].tolist()
    assert all(sp.temperature == 0.0 and sp.top_p == 1.0 for sp in params)
    # the engine: the student's folder, the student's dtype, the default knobs, in-process
    assert llm.kwargs == dict(
        model=str(tiny_model_dir),
        tokenizer=str(tiny_model_dir),
        dtype="float32",
        gpu_memory_utilization=0.3,
        enforce_eager=False,
        seed=0,
    )
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_engine_knobs_and_name_from_model(fake_vllm, tiny, tiny_model_dir: Path) -> None:
    model, tok, prompts = tiny
    cfg = VLLMCfg(
        gpu_memory_utilization=0.5, dtype="bfloat16", enforce_eager=True, max_model_len=99
    )
    sampler = VLLMSampler(None, cfg)  # the folder comes from model.config._name_or_path
    sampler(model, tok, prompts[:2], max_new_tokens=3, greedy=True)
    (llm,) = FakeLLM.instances
    assert llm.kwargs["model"] == str(tiny_model_dir)
    assert llm.kwargs["dtype"] == "bfloat16"
    assert llm.kwargs["gpu_memory_utilization"] == 0.5
    assert llm.kwargs["enforce_eager"] is True and llm.kwargs["max_model_len"] == 99


def test_weights_are_synced_before_every_call(fake_vllm, tiny, tiny_model_dir: Path) -> None:
    model, tok, prompts = tiny
    sampler = VLLMSampler(str(tiny_model_dir))
    first = sampler(model, tok, prompts, max_new_tokens=8, greedy=True)
    (llm,) = FakeLLM.instances
    names = set(model.state_dict())
    assert len(llm.model.loads) == 1 and set(llm.model.loads[0]) == names
    assert llm.events == ["apply_model", "reset_prefix_cache", "generate"]
    # a training step changes the student: the next call must sample from the new weights
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    second = sampler(model, tok, prompts, max_new_tokens=8, greedy=True)
    assert len(llm.model.loads) == 2 and sampler.syncs == 2
    assert llm.events[3:] == ["apply_model", "reset_prefix_cache", "generate"]
    for name, value in model.state_dict().items():
        assert torch.equal(llm.model.loads[1][name], value), name
    assert not torch.equal(first.input_ids, second.input_ids)  # the change mattered
    _assert_same_rollout(second, generate(model, tok, prompts, max_new_tokens=8, greedy=True))


def test_sampling_parameters_are_mapped(fake_vllm, tiny, tiny_model_dir: Path) -> None:
    model, tok, prompts = tiny
    sampler = VLLMSampler(str(tiny_model_dir))
    same = [prompts[0]] * 6
    roll = sampler(model, tok, same, max_new_tokens=5, temperature=0.7, top_p=0.9, seed=3)
    (llm,) = FakeLLM.instances
    _, params = llm.calls[-1]
    eos = eos_token_ids(model, tok)
    for sp in params:
        assert sp.temperature == 0.7 and sp.top_p == 0.9 and sp.max_tokens == 5
        assert sp.stop_token_ids == eos and sp.n == 1 and sp.skip_special_tokens is True
    seeds = [sp.seed for sp in params]
    assert len(set(seeds)) == len(seeds) and all(s >= 0 for s in seeds)  # one per request
    assert len({tuple(r) for r in roll.response_ids.tolist()}) > 1  # equal prompts, rows differ
    again = sampler(model, tok, same, max_new_tokens=5, temperature=0.7, top_p=0.9, seed=3)
    assert [sp.seed for sp in llm.calls[-1][1]] == seeds
    _assert_same_rollout(again, roll)  # reproducible for one seed
    other = sampler(model, tok, same, max_new_tokens=5, temperature=0.7, top_p=0.9, seed=4)
    assert [sp.seed for sp in llm.calls[-1][1]] != seeds
    assert not torch.equal(other.input_ids, roll.input_ids)
    sampler(model, tok, same[:2], max_new_tokens=4)  # no seed: vLLM's own generator
    assert all(sp.seed is None and sp.temperature == 1.0 for sp in llm.calls[-1][1])
    with pytest.raises(UserError, match="temperature"):
        sampler(model, tok, same, max_new_tokens=4, temperature=0.0)
    with pytest.raises(UserError, match="top_p"):
        sampler(model, tok, same, max_new_tokens=4, top_p=1.5)


def test_sampling_kwargs_unit() -> None:
    kw = sampling_kwargs(7, 0.8, 0.95, False, [2, 0], 11)
    assert kw == dict(
        n=1,
        temperature=0.8,
        top_p=0.95,
        max_tokens=7,
        stop_token_ids=[2, 0],
        seed=11,
        skip_special_tokens=True,
        detokenize=False,
    )
    greedy = sampling_kwargs(7, 0.8, 0.95, True, [2], None)
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0


def test_refuses_multi_process_training(
    fake_vllm, tiny, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok, prompts = tiny
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    with pytest.raises(UserError, match="single training process"):
        VLLMSampler(str(tiny_model_dir))(model, tok, prompts, max_new_tokens=3)
    assert FakeLLM.instances == []


# ------------------------------------------------------------------------------------ LoRA


def _lora(model: torch.nn.Module, **kw: Any) -> Any:
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw)
    wrapped = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return wrapped


def test_lora_weights_are_merged_without_touching_the_model(fake_vllm, tiny, tiny_model_dir):
    model, tok, prompts = tiny
    wrapped = _lora(model)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    got = dict(student_weights(wrapped))
    merged = copy.deepcopy(wrapped).merge_and_unload().state_dict()
    assert set(got) == set(merged)
    for name, value in merged.items():
        assert torch.allclose(got[name], value, atol=1e-6), name
    after = wrapped.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in wrapped.modules())
    # and the engine samples what the adapter-wrapped student samples
    roll = VLLMSampler(str(tiny_model_dir))(wrapped, tok, prompts, max_new_tokens=6, greedy=True)
    _assert_same_rollout(roll, generate(wrapped, tok, prompts, max_new_tokens=6, greedy=True))


def test_dora_is_refused(tiny) -> None:
    model, _, _ = tiny
    wrapped = _lora(model, use_dora=True)
    with pytest.raises(UserError, match="DoRA"):
        student_weights(wrapped)

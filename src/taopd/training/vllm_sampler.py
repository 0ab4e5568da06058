"""vLLM rollout backend: one engine colocated on the trainer's GPU, synced to the student per call.

`VLLMSampler` has the call signature of `rollout.generate` and returns a `Rollout` in the same
layout: the prompts are tokenized here with the student's tokenizer (left padded, as `generate`
does) and handed to vLLM as token ids, so both backends see identical prompts. vLLM is imported
only when the engine is built; `sampling.make_sampler("vllm")` checks that it is installed.

Checked against the vllm 0.33.0 wheel: `LLM(...)`, `LLM.generate(prompts, sampling_params,
use_tqdm=...)`, `LLM.apply_model(fn)` (runs `fn(model)` in the worker: in this process, since the
engine is built with VLLM_ENABLE_V1_MULTIPROCESSING=0), `model.load_weights(iterable of
(hf_name, tensor))`, `LLM.reset_prefix_cache()`, `TokensPrompt`, `SamplingParams`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import Tensor, nn

from taopd import seeds
from taopd.config import VLLMCfg
from taopd.errors import UserError
from taopd.models import _unwrap, resolve_model
from taopd.training.rollout import (
    Rollout,
    assemble_rollout,
    check_sampling,
    eos_token_ids,
    tokenize_left,
)

__all__ = ["VLLMSampler", "sampling_kwargs", "student_weights"]

_SEED_MOD = 2**63  # per-request seeds stay non-negative int64


def sampling_kwargs(
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
    eos_ids: list[int],
    seed: int | None,
) -> dict[str, Any]:
    """Keyword arguments of one request's `vllm.SamplingParams` (greedy = temperature 0).

    Unset knobs keep vLLM's neutral defaults (top_k, min_p, penalties off); an explicit
    SamplingParams is not merged with the model's generation_config, so this is exactly
    softmax(logits / temperature) within top_p, as in `rollout.generate`.
    """
    return dict(
        n=1,
        temperature=0.0 if greedy else float(temperature),
        top_p=1.0 if greedy else float(top_p),
        max_tokens=int(max_new_tokens),
        stop_token_ids=list(eos_ids),
        seed=seed,
        skip_special_tokens=True,
        detokenize=False,  # texts are decoded here from the kept tokens
    )


def _is_lora_layer(module: nn.Module) -> bool:
    """True for a peft LoRA layer (a base layer plus adapters whose delta it can compute)."""
    return hasattr(module, "base_layer") and callable(getattr(module, "get_delta_weight", None))


@torch.no_grad()
def _merged_lora_weights(base: nn.Module) -> dict[str, Tensor]:
    """HF-named weights of a peft-injected model with the active LoRA deltas added (new tensors).

    The training model is not touched: each LoRA layer's weight is `W + Σ delta(adapter)`
    computed out of place, so the adapters keep training on the unmerged base.
    """
    out: dict[str, Tensor] = {}
    for key, value in base.state_dict().items():
        if ".modules_to_save." in key or ".original_module." in key:
            raise UserError(
                "rollout.backend 'vllm' with LoRA supports plain LoRA adapters only "
                f"(found modules_to_save weight {key}); use rollout.backend 'hf'"
            )
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach()
    for name, module in base.named_modules():
        if not _is_lora_layer(module):
            continue
        if getattr(module, "disable_adapters", False):
            continue
        merged = set(getattr(module, "merged_adapters", []))
        present = set(module.lora_A) | set(getattr(module, "lora_embedding_A", {}))
        adapters = [a for a in module.active_adapters if a in present and a not in merged]
        if not adapters:
            continue
        if any(a in getattr(module, "lora_variant", {}) for a in adapters):
            raise UserError(
                f"rollout.backend 'vllm' cannot merge the LoRA variant (e.g. DoRA) of {name}; "
                "use plain LoRA or rollout.backend 'hf'"
            )
        layer = module.get_base_layer()
        weight = layer.weight.detach()
        delta = sum(module.get_delta_weight(a) for a in adapters)
        out[f"{name}.weight"] = weight + delta.to(weight.dtype)
        biased = [a for a in adapters if getattr(module, "lora_bias", {}).get(a, False)]
        if biased:
            bias = layer.bias.detach()
            extra = sum(module.lora_B[a].bias * module.scaling[a] for a in biased)
            out[f"{name}.bias"] = bias + extra.to(bias.dtype)
    return out


def student_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(HF name, tensor) pairs of the student as `load_weights` takes them; LoRA merged in.

    A plain model gives its state_dict (no copies). A peft model gives the base weights with
    the active adapters added, leaving the training model unmerged.
    """
    inner = _unwrap(model)
    if any(_is_lora_layer(m) for m in inner.modules()):
        return list(_merged_lora_weights(inner).items())
    return [(k, v.detach()) for k, v in inner.state_dict().items()]


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, greedy: bool) -> None:
    """Refuse settings vLLM would reject or misread, with the knob to change."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if not greedy:
        check_sampling(temperature, top_p)


def _sampling_params(vllm: Any, n: int, settings: tuple, seed: int | None) -> Any:
    """One `SamplingParams` for all `n` requests, or with `seed` (and sampling) one per request
    with its own seed derived from it. `settings`: `sampling_kwargs`' first five arguments."""
    if seed is None or settings[3]:  # no seed, or greedy
        return vllm.SamplingParams(**sampling_kwargs(*settings, None))
    return [
        vllm.SamplingParams(**sampling_kwargs(*settings, seeds.per_prompt(seed, i) % _SEED_MOD))
        for i in range(n)
    ]


class VLLMSampler:
    """A `Sampler` backed by a colocated vLLM engine that gets the student's weights every call.

    `model_name` is the student as taopd names it ('smollm2', a folder or a hub id); the engine
    is built lazily from it (architecture and tokenizer) on the first call. Without a name, the
    folder the model was loaded from (`config._name_or_path`) is used.
    """

    def __init__(self, model_name: str | None = None, cfg: VLLMCfg | None = None) -> None:
        self.model_name = model_name
        self.cfg = cfg if cfg is not None else VLLMCfg()
        self.llm: Any = None
        self.syncs = 0  # weight syncs so far
        self.last_sync_s = 0.0  # seconds of the latest sync (load_weights + prefix-cache reset)
        self.engine_start_s = 0.0  # seconds to build the engine

    # ------------------------------------------------------------------------------ engine
    def _engine_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """`vllm.LLM` arguments: the student's folder, the dtype, the memory and length caps."""
        name = self.model_name
        if not name:
            name = getattr(getattr(_unwrap(model), "config", None), "_name_or_path", "") or ""
        if not name:
            raise UserError(
                "VLLMSampler needs the student's name or folder (model_name) to build the engine"
            )
        path = resolve_model(name)
        dtype = self.cfg.dtype
        if dtype == "auto":
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        kw: dict[str, Any] = dict(
            model=path,
            tokenizer=path,
            dtype=dtype,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            enforce_eager=self.cfg.enforce_eager,
            seed=0,
        )
        if self.cfg.max_model_len is not None:
            kw["max_model_len"] = self.cfg.max_model_len
        return kw

    def engine(self, model: nn.Module) -> Any:
        """The `vllm.LLM`, built on first use in this process (colocated with the trainer)."""
        if self.llm is not None:
            return self.llm
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            raise UserError(
                "rollout.backend 'vllm' runs one engine in a single training process; "
                "multi-process training with vLLM is not supported yet: use backend 'hf'"
            )
        import vllm

        kw = self._engine_kwargs(model)
        # in-process engine core: apply_model then runs load_weights here, on the tensors
        # themselves, instead of pickling the student's weights to an engine process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kw)
        self.engine_start_s = time.perf_counter() - t0
        return self.llm

    def sync_weights(self, model: nn.Module) -> None:
        """Load the student's current weights into the engine and drop its stale prefix cache."""
        llm = self.engine(model)
        t0 = time.perf_counter()
        weights = student_weights(model)
        results = llm.apply_model(lambda m: m.load_weights(weights))
        if not any(results):
            raise RuntimeError("vLLM loaded none of the student's weights (name mismatch?)")
        llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.last_sync_s = time.perf_counter() - t0
        self.syncs += 1

    # ------------------------------------------------------------------------------ sampling
    def __call__(
        self,
        model: Any,
        tokenizer: Any,
        prompts: list[str],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> Rollout:
        """Sample with the engine after syncing `model`'s weights; same layout as `generate`.

        `batch_size` is ignored (vLLM schedules its own batches). With `seed`, request i gets
        its own seed derived from it, so equal prompts in one call still sample differently.
        """
        if not prompts:
            raise ValueError("the vLLM sampler needs at least one prompt")
        _check_sampling(max_new_tokens, temperature, top_p, greedy)
        import vllm

        eos_ids = eos_token_ids(model, tokenizer)
        if tokenizer.pad_token is None:  # as generate does
            tokenizer.pad_token = tokenizer.eos_token
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        prompt_ids, prompt_mask = tokenize_left(tokenizer, prompts)
        device = next(model.parameters()).device

        self.sync_weights(model)
        requests = [
            vllm.TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
            for ids, mask in zip(prompt_ids, prompt_mask)
        ]
        settings = (max_new_tokens, temperature, top_p, greedy, eos_ids)
        params = _sampling_params(vllm, len(requests), settings, seed)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        responses = [list(out.outputs[0].token_ids) for out in outputs]
        return assemble_rollout(
            prompt_ids, prompt_mask, responses, eos_ids, pad_id, tokenizer, device
        )

"""Rollouts: prompts with sampled responses on one padded grid, and the HF sampling backend.

`generate` runs `model.generate` with a KV cache on left-padded prompts. Other backends (vLLM,
vllm_sampler.py) build the same `Rollout` with `assemble_rollout`; sampling.py picks one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from taopd.errors import UserError

__all__ = [
    "Rollout",
    "Sampler",
    "eos_token_ids",
    "generate",
    "response_hidden",
    "response_mask",
]


@dataclass
class Rollout:
    """A batch of prompts with their sampled responses, all on one [B, T] grid.

    Layout of row b: `prompt_len` columns of left-padded prompt, then the response, then right
    padding after the first eos (or after max_new_tokens). Column j of the response region is
    `input_ids[b, prompt_len + j]`.

    Positions: the token at column t is predicted by the logits at column t - 1. The trainer runs
    the body once on `input_ids` and uses `hidden[:, prompt_len - 1 : -1]` to predict
    `input_ids[:, prompt_len:]`, with `response_mask[:, prompt_len:]` marking the positions that
    count. `hidden_states` in models.py uses the same position ids as `generate`, so those
    logits are the sampler's logits.
    """

    input_ids: Tensor  # [B, T] long; pad id on padding
    attention_mask: Tensor  # [B, T] long; 1 on real prompt tokens and on masked-in response tokens
    response_mask: Tensor  # [B, T] bool; True on response tokens up to and including first eos
    prompt_len: int  # width of the (left-padded) prompt block
    texts: list[str]  # decoded responses, special tokens skipped

    @property
    def response_ids(self) -> Tensor:
        """Response columns of `input_ids` [B, T - prompt_len]."""
        return self.input_ids[:, self.prompt_len :]

    @property
    def response_lengths(self) -> Tensor:
        """Number of response tokens of each row (eos included) [B]."""
        return self.response_mask.sum(dim=1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, rows: slice | Sequence[int]) -> Rollout:
        """The rollout of some rows (a slice, or row indices in the order given)."""
        texts = self.texts[rows] if isinstance(rows, slice) else [self.texts[i] for i in rows]
        index = rows if isinstance(rows, slice) else list(rows)
        return Rollout(
            self.input_ids[index],
            self.attention_mask[index],
            self.response_mask[index],
            self.prompt_len,
            list(texts),
        )

    @staticmethod
    def concat(parts: Sequence[Rollout], pad_id: int) -> Rollout:
        """One Rollout of several: prompts re-aligned to the widest left-padded block, responses
        right-padded to the longest (the layout `generate` gives one batch)."""
        if len(parts) == 1:
            return parts[0]
        p = max(r.prompt_len for r in parts)
        width = max(r.input_ids.shape[1] - r.prompt_len for r in parts)
        ids, att, resp = [], [], []
        for r in parts:
            pad = (p - r.prompt_len, width - (r.input_ids.shape[1] - r.prompt_len))
            ids.append(torch.nn.functional.pad(r.input_ids, pad, value=pad_id))
            att.append(torch.nn.functional.pad(r.attention_mask, pad, value=0))
            resp.append(torch.nn.functional.pad(r.response_mask, pad, value=False))
        texts = [t for r in parts for t in r.texts]
        return Rollout(torch.cat(ids), torch.cat(att), torch.cat(resp), p, texts)

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with the tensors on `device`."""
        return Rollout(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            self.prompt_len,
            list(self.texts),
        )


class Sampler(Protocol):
    """What a backend provides: prompts in, a Rollout out (see `generate` for the arguments)."""

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
    ) -> Rollout: ...


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse a sampling temperature or top_p that HF generate and vLLM would reject or misread."""
    if temperature <= 0:
        raise UserError(
            f"temperature must be > 0 for sampling (got {temperature}); use greedy decoding instead"
        )
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (got {top_p})")


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """All ids that end a response: the tokenizer's eos and the model's generation-config eos."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if extra is not None:
        for i in extra if isinstance(extra, (list, tuple)) else [extra]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise UserError("neither the tokenizer nor the model defines an eos token")
    return ids


def response_mask(response: Tensor, eos_ids: list[int], lengths: Tensor | None = None) -> Tensor:
    """[B, L] bool: True up to and including the first eos of each row (and below `lengths`)."""
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device))
    before_or_at_first = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0
    if lengths is not None:
        cols = torch.arange(response.shape[1], device=response.device)
        before_or_at_first &= cols[None, :] < lengths[:, None]
    return before_or_at_first


def _add_special_tokens(tokenizer: Any, prompts: list[str]) -> bool:
    """False when prompts already carry the bos text (a rendered chat template): no double bos."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and all(p.startswith(bos) for p in prompts))


def _generation_config(
    model: Any,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
    eos_ids: list[int],
    pad_id: int,
) -> Any:
    """A GenerationConfig sampling exactly softmax(logits / temperature) within top_p.

    A model's generation_config.json may set top_k, repetition_penalty, min_p, ...; HF merges
    those (and a global top_k=50) into unset fields, which would change the on-policy
    distribution, so every such knob is set to its neutral value here.
    """
    from transformers import GenerationConfig

    kw: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        num_beams=1,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        return_dict_in_generate=False,
    )
    if greedy:
        kw.update(do_sample=False)
    else:
        check_sampling(temperature, top_p)
        kw.update(
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
        model_gen = getattr(model, "generation_config", None)
        if getattr(model_gen, "min_p", None) is not None:
            kw["min_p"] = 0.0
    return GenerationConfig(**kw)


def tokenize_left(tokenizer: Any, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and mask [n, width]; special tokens only if the template has none."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=_add_special_tokens(tokenizer, prompts),
        )
    finally:
        tokenizer.padding_side = old_side
    return enc["input_ids"], enc["attention_mask"]


def assemble_rollout(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    responses: list[list[int]],
    eos_ids: list[int],
    pad_id: int,
    tokenizer: Any,
    device: torch.device,
) -> Rollout:
    """A `Rollout` from left-padded prompts and per-row response tokens (cut after first eos)."""
    n, width = prompt_ids.shape
    resp_width = max(1, max(len(r) for r in responses))
    resp = torch.full((n, resp_width), pad_id, dtype=torch.long)
    lengths = torch.zeros(n, dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        lengths[i] = len(r)
    rmask = response_mask(resp, eos_ids, lengths)
    used = int(rmask.sum(dim=1).max()) if rmask.numel() else 0
    resp, rmask = resp[:, :used], rmask[:, :used]
    resp = resp.masked_fill(~rmask, pad_id)
    input_ids = torch.cat([prompt_ids, resp], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), rmask.long()], dim=1)
    full_rmask = torch.cat([torch.zeros(n, width, dtype=torch.bool), rmask], dim=1)
    texts = [
        tokenizer.decode(resp[i][rmask[i]].tolist(), skip_special_tokens=True) for i in range(n)
    ]
    return Rollout(
        input_ids.to(device), attention_mask.to(device), full_rmask.to(device), width, texts
    )


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int | None = None,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> Rollout:
    """Sample responses with HF `generate` (KV cache, left padding) and mask what follows eos.

    `seed` calls `torch.manual_seed(seed)` first, so a rollout is reproducible on one device.
    Prompts are tokenized together (one `prompt_len`) and generated `batch_size` at a time, each
    batch cut to its own longest prompt. Extra keyword arguments go to `model.generate`.
    """
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if seed is not None:
        torch.manual_seed(seed)
    eos_ids = eos_token_ids(model, tokenizer)
    if tokenizer.pad_token is None:  # as load_tokenizer does; padding needs a pad token
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    cfg = _generation_config(model, max_new_tokens, temperature, top_p, greedy, eos_ids, pad_id)
    device = next(model.parameters()).device

    prompt_ids, prompt_mask = tokenize_left(tokenizer, prompts)
    n, width = prompt_ids.shape
    step = batch_size or n

    # taopd gathers sharded weights before generating, so ranks need not decode in lockstep
    # (transformers would sync FSDP-managed models, hanging a rank with no prompts)
    generate_kwargs.setdefault("synced_gpus", False)
    was_training = model.training
    model.eval()
    responses: list[Tensor] = []
    try:
        for start in range(0, n, step):
            ids = prompt_ids[start : start + step]
            mask = prompt_mask[start : start + step]
            first = int(mask.any(dim=0).long().argmax())  # drop columns that are pad in every row
            out = model.generate(
                input_ids=ids[:, first:].to(device),
                attention_mask=mask[:, first:].to(device),
                generation_config=cfg,
                **generate_kwargs,
            )
            responses.append(out[:, width - first :].cpu())
    finally:
        model.train(was_training)

    rows = [row.tolist() for r in responses for row in r]  # each cut after its first eos below
    return assemble_rollout(prompt_ids, prompt_mask, rows, eos_ids, pad_id, tokenizer, device)


def response_hidden(
    model: Any, roll: Rollout, rows: slice | Tensor = slice(None), cols: int | None = None
) -> Tensor:
    """Hidden states that predict the response columns: `hidden[:, p-1:-1]` ↦ `input_ids[:, p:]`.

    One body forward over `rows` of the rollout (a slice or row indices); no [B, T, V] logits
    are made. `cols` runs only the first `cols` response columns: a causal body's hidden states
    there do not depend on the columns after them.
    """
    from taopd.models import hidden_states

    p = roll.prompt_len
    ids, am = roll.input_ids[rows], roll.attention_mask[rows]
    if cols is not None:
        ids, am = ids[:, : p + cols], am[:, : p + cols]
    h = hidden_states(model, ids, am)
    return h[:, p - 1 : -1]

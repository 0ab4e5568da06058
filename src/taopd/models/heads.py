"""A causal LM's parts as the trainer uses them: the decoder body (post-final-norm hidden
states), the output embedding, positions as `generate` computes them, and LoRA adapters.

The trainer never materializes [B, T, V] logits: it runs `body(model)` to get the hidden states
and multiplies only the rows it keeps by `lm_head(model)`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from taopd.errors import UserError

__all__ = ["apply_lora", "body", "hidden_states", "lm_head", "position_ids"]


def lm_head(model: nn.Module) -> nn.Parameter:
    """The output embedding weight [V_padded, d] of `model` (also through a peft wrapper)."""
    head = model.get_output_embeddings()
    if head is None:
        raise UserError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    weight = getattr(head, "weight", None)
    if weight is None and hasattr(head, "base_layer"):  # peft-wrapped lm_head
        weight = head.base_layer.weight
    return weight


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft (or similar) wrapper; the model itself otherwise."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def body(model: nn.Module) -> nn.Module:
    """The module whose forward returns post-final-norm hidden states (the model minus lm_head)."""
    inner = _unwrap(model)
    get_decoder = getattr(inner, "get_decoder", None)
    if callable(get_decoder):
        dec = get_decoder()
        if dec is not None and dec is not inner:
            return dec
    for attr in ("model", "transformer"):
        sub = getattr(inner, attr, None)
        if isinstance(sub, nn.Module):
            return sub
    base = getattr(inner, "base_model", None)
    if isinstance(base, nn.Module) and base is not inner:
        return base
    raise UserError(f"cannot find the decoder body of {type(inner).__name__}")


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions as HF `generate` computes them for left padding (cumsum of the mask, pads 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Post-final-norm hidden states [B, T, d]; never computes the [B, T, V] logits.

    Positions follow `generate` (left padding shifts them), so `hidden @ lm_head.T` reproduces
    the logits the sampler used.
    """
    out = body(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def apply_lora(model: nn.Module, lc: Any) -> nn.Module:
    """`model` with LoRA adapters of `lc` (config.LoraCfg: r, alpha, dropout, target modules)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("lora: needs the peft extra: pip install 'taopd[peft]'") from None
    return get_peft_model(
        model,
        LoraConfig(
            r=lc.r,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            target_modules=lc.target_modules,
            task_type="CAUSAL_LM",
        ),
    )

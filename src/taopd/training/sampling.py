"""Choosing a sampling backend: HF `generate` (rollout.py) or a colocated vLLM engine.

Kept apart from rollout.py so that vllm_sampler.py can build on rollout.py without an import
circle: this module imports both, neither imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from taopd.errors import UserError
from taopd.training.rollout import Rollout, generate

if TYPE_CHECKING:
    from taopd.config import Config, VLLMCfg

__all__ = ["make_sampler"]


def make_sampler(
    backend: str | Config = "hf", model_name: str | None = None, vllm_cfg: VLLMCfg | None = None
) -> Callable[..., Rollout]:
    """The sampling function of a backend: 'hf' (transformers generate) or 'vllm'.

    `backend` may also be a run `Config`: its rollout.backend, student and rollout.vllm are
    used. 'vllm' imports vLLM only here and needs a CUDA GPU; `model_name` is the student the
    engine is built from (see `taopd.training.vllm_sampler.VLLMSampler`), `vllm_cfg` its `VLLMCfg`.
    """
    if not isinstance(backend, str):  # a Config
        model_name = model_name or backend.student
        vllm_cfg = vllm_cfg or backend.rollout.vllm
        backend = backend.rollout.backend
    name = backend.strip().lower()
    if name in ("hf", "transformers"):
        return generate
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError(
                "rollout.backend 'vllm' needs the vllm extra (GPU only): pip install 'taopd[vllm]'"
            ) from None
        if not torch.cuda.is_available():
            raise UserError(
                "rollout.backend 'vllm' needs a CUDA GPU and none is visible; "
                "use rollout.backend 'hf'"
            )
        from taopd.training.vllm_sampler import VLLMSampler

        return VLLMSampler(model_name, vllm_cfg)
    raise UserError(f"unknown sampling backend {backend!r}: use 'hf' or 'vllm'")

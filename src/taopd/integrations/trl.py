"""TA-OPD inside TRL's `DistillationTrainer`: teachable-token selection as TRL's loss mask.

    from taopd.integrations.trl import (
        TeachabilityDistillationConfig, TeachabilityDistillationTrainer)
    args = TeachabilityDistillationConfig(output_dir="out", beta=1.0,
                                          selection_strategy="teachability", selection_ratio=0.05)
    TeachabilityDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                    train_dataset=ds, processing_class=tok).train()

Checked against TRL 1.16 only (`pip install 'taopd[trl]'`); another version is refused at
import. It relies on two private methods of `trl.DistillationTrainer` (a third, `_compute_loss`,
only in weight mode; see the end):

- `_generate_and_score_completions`: the one place where a whole generation batch (all
  gradient-accumulation micro-batches of this rank) exists before TRL splits it, so selection
  over the global batch (Eq. 13) can happen there. After TRL generated, one no-grad pass of both
  bodies feeds `taopd.signals_from_hidden` (chunked, with each head's bias / scale / softcap);
  the signals of every rank are gathered and `taopd.select_tokens` keeps the top ⌈ρ·|I|⌉ of the
  global batch, I = TRL's own loss mask (completion mask × tool mask). The kept positions go
  into the batch's `tool_mask`, the per-position loss mask TRL's `_compute_loss` multiplies in
  (the attention mask is untouched), and `num_items_in_batch` becomes the global kept count, so
  TRL's loss is the mean over kept positions (Eq. 7) under gradient accumulation and DDP.
- `_get_last_hidden_state`: the teacher hidden states of the scoring pass travel with the batch
  (split and shuffled by TRL with the rest) and are served here when TRL's loss asks for the
  teacher's, so the step does not run the teacher twice (`selection_cache_teacher=False` turns
  this off, trading a second teacher forward for memory).

Evaluation keeps TRL's loss over all positions; TRL's own `entropy` metric becomes the mean
over the kept positions (the positions its loss sees). Strategy "full" or ratio 1 skips the scoring
pass: the run is vanilla TRL. Refused: multimodal batches, a teacher without local weights
(TRL's server trainers), an lm_head that is not `torch.nn.Linear`.

Every taopd rule works. The position rule `early` (1 − t/T_i: the earliest share of every
completion) is a strategy like the others. `selection_mode="weight"` trains on every valid
position, each with its weight from `taopd.core.weights.token_weights`: a score strategy's
weights (mean 1 over the global batch, floor `selection_weight_floor`) or IW-OPD's own in
[1, 1 + γ] (strategy "iw_opd", γ = `selection_iw_gamma`; the scoring pass then also reads the
sampled tokens). `selection_ratio` left unset is 1 there (any other value is refused) and 0.05
in select mode. The weights travel with the batch like the teacher hidden states, and a third
private method is overridden: `_compute_loss`, in weight mode only, returns Σ_t w_t ℓ_t /
num_items_in_batch from `taopd.selective_head_loss` (TRL's normalization, the global valid
count; TRL's `beta` as the loss kind: 1 reverse KL, 0 forward KL, else the generalized JSD,
whose convention TRL shares), reading both bodies through `_get_last_hidden_state`
(`trl_weights.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from torch import Tensor, nn

from taopd.core.scores import HeadSpec, TokenSignals, Workspace, normalize, signals_from_hidden
from taopd.core.selection import select_tokens
from taopd.core.weights import token_weights

from .trl_weights import ENTROPY_KEY, WEIGHT_KEY, loss_kind, weight_metrics, weighted_loss

__all__ = [
    "SUPPORTED_TRL",
    "TeachabilityDistillationConfig",
    "TeachabilityDistillationTrainer",
    "head_spec",
]

SUPPORTED_TRL = (">=1.16", "<1.17")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
_TEACHER_KEY = "taopd_teacher_hidden"  # the cached teacher hidden states in a batch dict


def check_trl_version(version: str | None = None) -> None:
    """Refuse a TRL outside the range this integration was checked against."""
    from packaging.version import Version

    found = version if version is not None else getattr(trl, "__version__", "unknown")
    try:
        ok = Version("1.16") <= Version(found) < Version("1.17")
    except Exception:
        ok = False
    if not ok:
        raise ImportError(
            f"taopd.integrations.trl supports trl{','.join(SUPPORTED_TRL)} (it relies on private "
            f"DistillationTrainer methods); found trl {found}: pip install 'taopd[trl]'"
        )


check_trl_version()

from trl import DistillationConfig, DistillationTrainer  # noqa: E402

# config attributes that multiply the logits (TRL 1.16 reads the same names)
_SCALE_ATTRS = ("logit_scale", "output_multiplier", "lm_head_multiplier")


def head_spec(model: nn.Module) -> HeadSpec:
    """The `HeadSpec` (bias, logit scale, final-logit softcap) of a transformers causal LM.

    Refuses, by name, an output layer that is not a plain `torch.nn.Linear`.
    """
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(
            f"taopd: the lm_head of {type(model).__name__} is a {type(head).__name__}, not a "
            "torch.nn.Linear; only logits = softcap(scale·(h·Wᵀ + b)) are supported"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    config = config if config is not None else model.config
    scale = None
    for name in _SCALE_ATTRS:
        if getattr(config, name, None) is not None:
            scale = float(getattr(config, name))
            break
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        divisor = float(config.logits_scaling)  # Granite / MiniCPM3 divide; HyperCLOVA X multiplies
        scale = divisor if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / divisor
    softcap = getattr(config, "final_logit_softcapping", None)
    return HeadSpec(
        bias=head.bias,
        scale=1.0 if scale is None else scale,
        softcap=float(softcap) if softcap is not None else None,
    )


@dataclass
class TeachabilityDistillationConfig(DistillationConfig):
    """`trl.DistillationConfig` plus taopd's selection (validated as taopd's own `selection:`)."""

    selection_strategy: str = field(
        default="teachability",
        metadata={"help": "taopd strategy scoring each completion position (teachability = D̃·C̃)."},
    )
    selection_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Share ρ of the valid positions of the global batch that get a loss; unset: "
            "0.05 in mode 'select', 1 in mode 'weight' (which refuses any other value)."
        },
    )
    selection_k: int = field(default=16, metadata={"help": "Top-K of each model for D and C."})
    selection_scope: str = field(
        default="batch", metadata={"help": "'batch' (the paper) or 'sequence' (per completion)."}
    )
    selection_min_per_sequence: int = field(
        default=0, metadata={"help": "Keep at least this many positions per completion."}
    )
    selection_chunk_size: int = field(
        default=512, metadata={"help": "Positions projected through the vocabulary at a time."}
    )
    selection_cache_teacher: bool = field(
        default=True,
        metadata={"help": "Reuse the scoring pass's teacher hidden states in the loss step."},
    )
    selection_mode: str = field(
        default="select",
        metadata={
            "help": "'select': train on the top share selection_ratio; 'weight': train on every "
            "valid position, weighted by the strategy (taopd.core.weights; 'iw_opd' only here)."
        },
    )
    selection_weight_floor: float = field(
        default=0.1,
        metadata={"help": "Weight mode: w ∝ floor + (1 − floor)·score, mean 1 (1: plain TRL)."},
    )
    selection_iw_gamma: float = field(
        default=0.5, metadata={"help": "Strategy 'iw_opd': weights in [1, 1 + γ]."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from pydantic import ValidationError

        from taopd.config import SelectionCfg

        if self.selection_ratio is None:
            self.selection_ratio = 1.0 if self.selection_mode == "weight" else 0.05
        try:
            SelectionCfg(
                strategy=self.selection_strategy,
                ratio=self.selection_ratio,
                k=self.selection_k,
                scope=self.selection_scope,
                min_per_sequence=self.selection_min_per_sequence,
                chunk_size=self.selection_chunk_size,
                mode=self.selection_mode,
                weight_floor=self.selection_weight_floor,
                iw_gamma=self.selection_iw_gamma,
            )
        except ValidationError as err:
            first = err.errors()[0]
            name = "selection_" + str(first["loc"][0]) if first["loc"] else "selection_mode"
            msg = str(first["msg"]).removeprefix("Value error, ")
            if name == "selection_mode" and "budget ratio" in msg:
                msg += "; here: selection_ratio=1.0, or leave it unset"
            raise ValueError(f"{name}: {msg}") from None
        if self.weighted:
            loss_kind(self.beta)  # TRL's beta as taopd's loss kind (any beta in [0, 1])

    @property
    def weighted(self) -> bool:
        """True in selection_mode 'weight': every valid position, each with its weight."""
        return self.selection_mode == "weight"

    @property
    def selects(self) -> bool:
        """False when every valid position is kept unweighted (then the trainer is vanilla TRL)."""
        if self.weighted:
            return False
        return self.selection_strategy != "full" and self.selection_ratio < 1.0


class TeachabilityDistillationTrainer(DistillationTrainer):
    """`trl.DistillationTrainer` whose loss covers only the positions taopd selects (see module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_trl_version()
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, TeachabilityDistillationConfig):
            raise TypeError(
                "TeachabilityDistillationTrainer needs args=TeachabilityDistillationConfig(...), "
                f"got {type(self.args).__name__}"
            )
        if getattr(self, "teacher_model", None) is None:
            raise ValueError(
                "taopd: TeachabilityDistillationTrainer needs a local teacher_model (a teacher "
                "served top-k only is not supported inside TRL yet; see taopd.topk_signals)"
            )
        self._taopd_cached_teacher: Tensor | None = None
        self._taopd_heads: tuple[HeadSpec, HeadSpec] | None = None
        self._taopd_workspace = Workspace()  # scoring buffers kept across steps (no page faults)

    # -- scoring and selection, once per generation batch ------------------------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        if not self.args.selects and not self.args.weighted:
            self._metrics["train"]["taopd/kept_share"].append(1.0)
            return out
        for key in _MULTIMODAL_KEYS:
            if key in out:
                raise ValueError(f"taopd: selection on multimodal batches is not supported ({key})")
        return self._taopd_select(out)

    def _taopd_hidden(self, wrapper: nn.Module, unwrapped: nn.Module, out: dict) -> Tensor:
        input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        width = out["completion_ids"].size(1)
        return self._forward_redirection(
            wrapper, unwrapped, self._get_last_hidden_state, unwrapped, input_ids, attention_mask,
            width,
        )  # fmt: skip

    @torch.no_grad()
    def _taopd_select(self, out: dict[str, Any]) -> dict[str, Any]:
        """Score the generation batch; then select (the kept positions become TRL's tool mask)
        or, in weight mode, put every position's weight and student entropy into the batch."""
        args = self.args
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        if self._taopd_heads is None:
            self._taopd_heads = (head_spec(student), head_spec(teacher))
        self.teacher_model.eval()
        h_s = self._taopd_hidden(self.model_wrapped, student, out)
        h_t = self._taopd_hidden(self.teacher_model, teacher, out)
        valid = out["completion_mask"].bool()
        if "tool_mask" in out:
            valid = valid & out["tool_mask"].bool()
        w_s = student.get_output_embeddings().weight
        w_t = teacher.get_output_embeddings().weight
        tokens = out["completion_ids"] if args.selection_strategy == "iw_opd" else None
        sig = signals_from_hidden(
            h_s, w_s, h_t.to(h_s.device), w_t.to(h_s.device), tokens=tokens, k=args.selection_k,
            valid=valid, temperature=self.temperature, chunk_size=args.selection_chunk_size,
            student_head=self._taopd_heads[0], teacher_head=self._taopd_heads[1],
            workspace=self._taopd_workspace,
        )  # fmt: skip
        if args.weighted:
            metrics = self._taopd_global_weights(sig, valid, out)
        else:
            keep_local, metrics = self._taopd_global_selection(sig, valid)
            out["tool_mask"] = keep_local.to(out["completion_mask"].dtype)
            kept = int(metrics["taopd/kept_positions"])  # global: every rank's kept positions
            out["num_items_in_batch"] = torch.tensor(kept, dtype=torch.long, device=valid.device)
        for name, value in metrics.items():
            self._metrics["train"][name].append(value)
        if args.selection_cache_teacher:
            out[_TEACHER_KEY] = h_t
        return out

    def _taopd_gather(
        self, sig: TokenSignals, valid: Tensor
    ) -> tuple[TokenSignals, Tensor, tuple[slice, slice]]:
        """Every rank's signals and valid mask on CPU, and where this rank's rows are in them."""
        names = [name for name, _ in sig.items()]
        local = torch.stack([getattr(sig, n).float() for n in names] + [valid.float()], dim=-1)
        rows, width = valid.shape
        padded = self.accelerator.pad_across_processes(local, dim=1, pad_index=0)
        every = self.accelerator.gather(padded).cpu()  # [ranks·rows, max width, fields + 1]
        g_valid = every[..., -1] > 0.5
        g_sig = TokenSignals(**{n: every[..., i] for i, n in enumerate(names)})
        rank = self.accelerator.process_index
        return g_sig, g_valid, (slice(rank * rows, (rank + 1) * rows), slice(0, width))

    def _taopd_global_selection(
        self, sig: TokenSignals, valid: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Gather every rank's signals, select over the global batch, return this rank's rows."""
        g_sig, g_valid, mine = self._taopd_gather(sig, valid)
        gen = torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + int(self._step))
        keep = select_tokens(
            g_sig,
            g_valid,
            strategy=self.args.selection_strategy,
            ratio=self.args.selection_ratio,
            scope=self.args.selection_scope,
            min_per_sequence=self.args.selection_min_per_sequence,
            generator=gen,
        )
        return keep[mine].to(valid.device), _selection_metrics(g_sig, g_valid, keep)

    def _taopd_global_weights(
        self, sig: TokenSignals, valid: Tensor, out: dict[str, Any]
    ) -> dict[str, float]:
        """Weight mode: the token weights of the global batch (mean 1 over it for score
        strategies); this rank's rows go into the batch with its student entropy."""
        g_sig, g_valid, mine = self._taopd_gather(sig, valid)
        args = self.args
        weights = token_weights(
            g_sig, g_valid, args.selection_strategy, floor=args.selection_weight_floor,
            gamma=args.selection_iw_gamma,
        )  # fmt: skip
        out[WEIGHT_KEY] = weights[mine].to(device=valid.device, dtype=torch.float32)
        out[ENTROPY_KEY] = sig.student_entropy.float()
        return weight_metrics(g_sig, g_valid, weights)

    # -- the loss step: serve the cached teacher hidden states --------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if _TEACHER_KEY in inputs:
            inputs = dict(inputs)
            self._taopd_cached_teacher = inputs.pop(_TEACHER_KEY)
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._taopd_cached_teacher = None

    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep,
                               *args: Any, **kwargs: Any):  # fmt: skip
        cached = self._taopd_cached_teacher
        if (
            cached is not None
            and unwrapped_model is self.accelerator.unwrap_model(self.teacher_model)
            and tuple(cached.shape[:2]) == (input_ids.size(0), logits_to_keep)
        ):
            self._taopd_cached_teacher = None
            return cached
        return super()._get_last_hidden_state(
            unwrapped_model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """TRL's loss; in weight mode (a batch carrying token weights) the weighted one."""
        if WEIGHT_KEY not in inputs:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        if self._taopd_heads is None:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            self._taopd_heads = (head_spec(unwrapped_student), head_spec(teacher))
        return weighted_loss(
            self, unwrapped_student, inputs, num_items_in_batch, self._taopd_heads,
            self.args.selection_chunk_size,
        )  # fmt: skip


def _selection_metrics(sig: TokenSignals, valid: Tensor, keep: Tensor) -> dict[str, float]:
    """Kept share and count; mean teachability / D / C / top-K overlap of kept vs all valid."""
    n_valid, n_kept = int(valid.sum()), int(keep.sum())
    out = {
        "taopd/kept_share": n_kept / n_valid if n_valid else 0.0,
        "taopd/kept_positions": float(n_kept),
    }
    if not n_valid:
        return out
    teach = normalize(sig.disagreement, valid) * normalize(sig.compatibility, valid)
    values = {
        "teachability": teach,
        "disagreement": sig.disagreement,
        "compatibility": sig.compatibility,
        "topk_overlap": sig.overlap,
    }
    for name, x in values.items():
        out[f"taopd/{name}_all"] = float(x[valid].double().mean())
        out[f"taopd/{name}_kept"] = float(x[keep].double().mean()) if n_kept else math.nan
    return out

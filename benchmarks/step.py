#!/usr/bin/env python
"""Wall time and peak memory of ONE distillation training step (rollout excluded), four arms.

Arms, on the same models, batch and sequence lengths, measured in one run, round-robin over the
repeats (the arm order rotates each round), median of the repeats:

  full   taopd full-token OPD: the selective-head path with mask = every valid position (no
         scoring pass; train.py's train_step currently scores even with strategy "full", for
         its metrics, which costs that step the (b) scoring time on top)
  taopd  taopd TA-OPD: teacher body (no grad), student body (grad), signals_from_hidden on the
         detached student hidden states, select_tokens(teachability, ratio), selective_head_loss,
         backward
  trl    TRL 1.16 DistillationTrainer's loss step with beta=1 (reverse KL): the trainer's
         `_chunked_divergence_loss` on both bodies' hidden states and lm_heads, as
         `DistillationTrainer._compute_loss` calls it, then backward
  floor  teacher body (no grad) + student body forward/backward with a trivial loss on the hidden
         states (no vocabulary projection at all): what no distillation loss can beat
  early  the position rule at the same ratio (`selection.strategy: early`): the trainer still
         runs the scoring pass (for its metrics), so the expected cost is (b)'s
  weight teachability-weighted full OPD (`selection.mode: weight`): the scoring pass, then the
         selective head over every valid position with per-position weights; expected: full's
         cost plus the scoring pass (no extra teacher pass)
  taopd-bf16  (b) with the scoring projections in bf16 (`projection_dtype=torch.bfloat16`, the
         trainer's `selection.projection_dtype: bfloat16`); softmaxes and sums stay fp32. The
         signals then differ from fp32 scoring: the table reports the share of (b)'s kept
         positions bf16 scoring also keeps, per batch seed (`--agreement-seeds`).

The taopd arms keep their scoring buffers in a `taopd.core.scores.Workspace` across steps, as the
trainer does; their peak memory adds the workspace's bytes (resident before the step, so the
high-water mark below would not see them).

A step is: zero the student's grads, the bodies, the loss, loss.backward(). The optimizer step
(the same for every arm) is left out. All arms use `taopd.models.hidden_states` for the bodies.

Peak memory (CPU): the process's resident-set high-water mark. Before each step the script
collects garbage, returns freed heap pages to the OS (glibc malloc_trim), reads VmRSS, resets the
kernel's high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), runs the step and
reads VmHWM. Peak = VmHWM - VmRSS before: every byte the step touched at its worst moment, torch
allocations, allocator slack and library workspaces included, at page granularity, spikes
included (the kernel tracks it; no sampling). On CUDA: torch.cuda.max_memory_allocated.

Usage:
  python benchmarks/step.py                                  # both real shapes, 3 repeats
  python benchmarks/step.py --shapes smollm2 --repeats 5 --threads 2 --json step.json
  python benchmarks/step.py --shapes tiny --repeats 1        # seconds; what the smoke test runs
  python benchmarks/step.py --shapes smollm2 --profile taopd,trl   # + torch.profiler top ops
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from taopd.core.loss import opd_loss, selective_head_loss  # noqa: E402
from taopd.core.scores import Workspace, signals_from_hidden  # noqa: E402
from taopd.core.selection import select_tokens  # noqa: E402
from taopd.core.weights import token_weights  # noqa: E402
from taopd.models import hidden_states, lm_head  # noqa: E402

ARMS = ("full", "taopd", "trl", "floor", "taopd-bf16", "early", "weight")
ARM_TITLES = {
    "full": "(a) taopd full-token OPD",
    "taopd": "(b) taopd TA-OPD",
    "taopd-bf16": "(b') TA-OPD, scoring projections in bf16",
    "trl": "(c) TRL 1.16 DistillationTrainer loss, beta=1",
    "floor": "(d) floor: bodies only, no vocabulary",
    "early": "(e) early (position rule), same ratio, with the scoring pass",
    "weight": "(f) teachability-weighted full OPD (selection.mode=weight)",
}
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Shapes


@dataclass
class Shape:
    name: str
    description: str
    batch: int
    tokens: int  # response positions per sequence (the loss positions)
    prompt: int  # prompt positions before them (the body runs on prompt + tokens)
    build: Callable[[], tuple[torch.nn.Module, torch.nn.Module]]  # -> (student, teacher)
    info: dict[str, Any] = field(default_factory=dict)


def _random_llama(vocab: int, hidden: int, layers: int, heads: int, kv: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4 // 2 * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def cut_layers(model: torch.nn.Module, n: int) -> torch.nn.Module:
    """Keep the first n decoder layers (SmolLM2 cut to a small student)."""
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]
    return model


def _smollm2() -> tuple[torch.nn.Module, torch.nn.Module]:
    from taopd.models import load_model

    teacher = load_model("smollm2")
    student = cut_layers(load_model("smollm2"), 6)
    return student, teacher


def _qwen_vocab() -> tuple[torch.nn.Module, torch.nn.Module]:
    student = _random_llama(151_936, 256, 2, 4, 2, seed=0)
    teacher = _random_llama(151_936, 384, 4, 6, 2, seed=1)
    return student, teacher


def _tiny() -> tuple[torch.nn.Module, torch.nn.Module]:
    return _random_llama(512, 32, 1, 2, 1, seed=0), _random_llama(512, 48, 2, 2, 1, seed=1)


SHAPES = {
    "smollm2": Shape(
        "smollm2",
        "student SmolLM2-135M cut to 6 layers, teacher SmolLM2-135M (30 layers), "
        "vocab 49,152, fp32",
        8,
        128,
        1,
        _smollm2,
    ),
    "qwen-vocab": Shape(
        "qwen-vocab",
        "random Llama bodies with a Qwen-size vocab 151,936: student hidden 256 "
        "x 2 layers, teacher hidden 384 x 4 layers, fp32",
        8,
        128,
        1,
        _qwen_vocab,
    ),
    "tiny": Shape(
        "tiny",
        "random Llama bodies, vocab 512, student 32 x 1, teacher 48 x 2 (smoke test)",
        2,
        16,
        1,
        _tiny,
    ),
}


# ---------------------------------------------------------------------------------------------
# Peak memory


class PeakMemory:
    """Peak bytes of a region: RSS high-water mark on CPU (see the module doc), CUDA allocator
    peak on GPU. `bytes` is None where neither is available."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._trim = None
        with contextlib.suppress(OSError):
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        self.available = self.cuda or self._can_reset()
        self.bytes: int | None = None

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "VmHWM" in Path("/proc/self/status").read_text()
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.available:
            if self._trim is not None:
                self._trim(0)
            self._base = self._status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.available:
            self.bytes = max(0, self._status("VmHWM") - self._base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The arms


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor
    targets: torch.Tensor  # [B, T] the response tokens
    valid: torch.Tensor  # [B, T] bool
    prompt: int


class Bench:
    def __init__(self, student, teacher, shape: Shape, args: argparse.Namespace, device):
        self.student, self.teacher, self.shape, self.args, self.device = (
            student,
            teacher,
            shape,
            args,
            device,
        )
        self.b = _make_batch(shape, lm_head(student).shape[0], device)
        self.w_s, self.w_t = lm_head(student), lm_head(teacher)
        self.trl_loss = _trl_loss_fn()
        scoring_arms = ("taopd", "taopd-bf16", "early", "weight")
        self.workspaces = {a: Workspace() for a in scoring_arms}  # one per arm that scores

    def _hidden(self, model, batch: Batch | None = None) -> torch.Tensor:
        b = batch or self.b
        h = hidden_states(model, b.input_ids, b.attention_mask)
        return h[:, b.prompt - 1 : -1]  # the positions that predict the response tokens

    def _bodies(self, ph: dict) -> tuple[torch.Tensor, torch.Tensor]:
        t = time.perf_counter()
        with torch.no_grad():
            h_t = self._hidden(self.teacher)
        h_s = self._hidden(self.student)
        _sync(self.device)
        ph["bodies"] = time.perf_counter() - t
        return h_s, h_t

    def signals(
        self, h_s: torch.Tensor, h_t: torch.Tensor, bf16: bool = False, batch=None, arm=None
    ):
        a, b = self.args, batch or self.b
        return signals_from_hidden(
            h_s,
            self.w_s.detach(),
            h_t,
            self.w_t,
            tokens=b.targets,
            k=a.k,
            valid=b.valid,
            chunk_size=a.score_chunk,
            projection_dtype=torch.bfloat16 if bf16 else None,
            workspace=self.workspaces[arm or ("taopd-bf16" if bf16 else "taopd")],
        )

    def _backward(self, loss: torch.Tensor, ph: dict) -> None:
        t = time.perf_counter()
        loss.backward()
        _sync(self.device)
        ph["backward"] = time.perf_counter() - t

    def step(self, arm: str) -> tuple[dict[str, float], float]:
        """One step of `arm`; returns (phase seconds, loss value)."""
        self.student.zero_grad(set_to_none=True)
        self.student.train()
        ph: dict[str, float] = {}
        a = self.args
        h_s, h_t = self._bodies(ph)
        t = time.perf_counter()
        if arm == "floor":
            loss = h_s.sum() * 0 + h_s.pow(2).mean()
        elif arm == "full":
            loss = selective_head_loss(
                h_s,
                self.w_s,
                self.b.valid,
                teacher_hidden=h_t,
                teacher_weight=self.w_t,
                tokens=self.b.targets,
                kind="reverse_kl",
                chunk_size=a.loss_chunk,
            )
        elif arm in ("taopd", "taopd-bf16", "early", "weight"):
            sig = self.signals(h_s.detach(), h_t, bf16=arm == "taopd-bf16", arm=arm)
            _sync(self.device)
            t1 = time.perf_counter()
            ph["scoring"] = t1 - t
            weights = None
            if arm == "weight":  # teachability-weighted full OPD (selection.mode=weight)
                mask, weights = self.b.valid, token_weights(sig, self.b.valid, "teachability")
            else:
                strategy = "early" if arm == "early" else "teachability"
                mask = select_tokens(sig, self.b.valid, strategy=strategy, ratio=a.ratio)
            _sync(self.device)
            t = time.perf_counter()
            ph["selection"] = t - t1
            loss = selective_head_loss(
                h_s,
                self.w_s,
                mask,
                teacher_hidden=h_t,
                teacher_weight=self.w_t,
                tokens=self.b.targets,
                kind="reverse_kl",
                chunk_size=a.loss_chunk,
                token_weights=weights,
            )
        elif arm == "trl":
            loss, _entropy, _n = self.trl_loss(
                h_s,
                h_t,
                self.w_s,
                self.w_t,
                self.b.valid.long(),
                1.0,
                num_items_in_batch=None,
                temperature=1.0,
            )
        else:
            raise ValueError(arm)
        _sync(self.device)
        ph["loss"] = time.perf_counter() - t
        self._backward(loss, ph)
        ph["total"] = sum(ph.values())
        return ph, float(loss.detach())

    # -- the loss phase alone: head forward + gradient to the hidden states and lm_head --------

    def loss_phase(self) -> dict[str, dict[str, float | int | None]]:
        """Peak memory and time of the loss phase alone (from hidden states to their grads and the
        lm_head's): TA-OPD's selective head vs a full-logit loss and the other chunked losses."""
        a, b = self.args, self.b
        with torch.no_grad():
            h_t = self._hidden(self.teacher)
            h_s0 = self._hidden(self.student)
            mask = select_tokens(self.signals(h_s0, h_t), b.valid, "teachability", a.ratio)
        w_s, w_t = self.w_s, self.w_t

        def selective(m):
            def run(h):
                return selective_head_loss(
                    h,
                    w_s,
                    m,
                    teacher_hidden=h_t,
                    teacher_weight=w_t,
                    tokens=b.targets,
                    kind="reverse_kl",
                    chunk_size=a.loss_chunk,
                )

            return run

        def dense(h):
            s_logits = h @ w_s.T
            with torch.no_grad():
                t_logits = h_t @ w_t.T
            return opd_loss(s_logits, t_logits, b.valid, kind="reverse_kl")

        def trl(h):
            return self.trl_loss(h, h_t, w_s, w_t, b.valid.long(), 1.0)[0]

        variants = {
            f"taopd selective head, {a.ratio:.0%} of rows": selective(mask),
            "taopd selective head, all rows": selective(b.valid),
            "full-logit opd_loss (dense [N, V] logits)": dense,
        }
        if self.trl_loss is not None:
            variants["TRL chunked divergence, beta=1"] = trl
        out = {}
        for name, fn in variants.items():
            h = h_s0.detach().clone().requires_grad_(True)
            self.student.zero_grad(set_to_none=True)
            with PeakMemory(self.device) as pm:
                t = time.perf_counter()
                loss = fn(h)
                grads = torch.autograd.grad(loss, [h, w_s])
                _sync(self.device)
                dt = time.perf_counter() - t
            del loss, grads, h
            out[name] = {"seconds": dt, "peak_bytes": pm.bytes}
        return out

    @torch.no_grad()
    def bf16_agreement(self, seeds: list[int]) -> dict[str, float]:
        """Per batch seed, the share of the positions fp32 scoring keeps that bf16 scoring also
        keeps (TA-OPD at the benchmark's ratio; each seed draws other token ids)."""
        a, out = self.args, {}
        for seed in seeds:
            vocab = self.w_s.shape[0]
            b = self.b if seed == 0 else _make_batch(self.shape, vocab, self.device, seed)
            h_t, h_s = self._hidden(self.teacher, b), self._hidden(self.student, b)
            masks = [
                select_tokens(self.signals(h_s, h_t, x, b), b.valid, "teachability", a.ratio)
                for x in (False, True)
            ]
            out[str(seed)] = float((masks[0] & masks[1]).sum() / masks[0].sum())
        return out


def _trl_loss_fn():
    """TRL's `_chunked_divergence_loss` (the function DistillationTrainer._compute_loss calls)."""
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError:
        return None
    return _chunked_divergence_loss


def _make_batch(shape: Shape, vocab: int, device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (shape.batch, shape.prompt + shape.tokens), generator=g)
    am = torch.ones_like(ids)
    valid = torch.ones(shape.batch, shape.tokens, dtype=torch.bool)
    return Batch(
        ids.to(device),
        am.to(device),
        ids[:, shape.prompt :].to(device),
        valid.to(device),
        shape.prompt,
    )


# ---------------------------------------------------------------------------------------------
# Running and reporting


def _median(xs: list[float | int | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def _profile(bench: Bench, arm: str, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if bench.device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as prof:
        bench.step(arm)
    key = "self_cuda_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=48)


def run_shape(shape: Shape, args, device) -> dict[str, Any]:
    t0 = time.perf_counter()
    student, teacher = shape.build()
    student.to(device)
    teacher.to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    vocab = lm_head(student).shape[0]
    bench = Bench(student, teacher, shape, args, device)
    batch = bench.b
    arms = [a for a in args.arms if a != "trl" or bench.trl_loss is not None]
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    info = {
        "description": shape.description,
        "batch": shape.batch,
        "response_tokens": shape.tokens,
        "body_tokens": shape.batch * (shape.prompt + shape.tokens),
        "loss_positions": int(batch.valid.sum()),
        "vocab": vocab,
        "student_params": n_params(student),
        "teacher_params": n_params(teacher),
        "student_layers": student.config.num_hidden_layers,
        "teacher_layers": teacher.config.num_hidden_layers,
        "load_seconds": time.perf_counter() - t0,
        "mflop_per_position": _flops(student, teacher, shape, vocab, args.ratio),
    }
    if bench.trl_loss is None:
        info["note"] = "trl not installed: arm (c) skipped (pip install -c constraints.txt trl)"
    res: dict[str, dict[str, list]] = {
        a: {"seconds": [], "peak_bytes": [], "phases": [], "loss": []} for a in arms
    }
    n_rounds = args.warmup + args.repeats
    for r in range(n_rounds):
        k = r % len(arms)
        for arm in arms[k:] + arms[:k]:  # round-robin; the first arm of a round rotates
            with PeakMemory(device) as pm:
                ph, loss = bench.step(arm)
            if pm.bytes is not None and arm in bench.workspaces:  # resident before the step
                pm.bytes += bench.workspaces[arm].nbytes
            if r >= args.warmup:
                res[arm]["seconds"].append(ph["total"])
                res[arm]["peak_bytes"].append(pm.bytes)
                res[arm]["phases"].append(ph)
                res[arm]["loss"].append(loss)
            print(
                f"  [{shape.name}] round {r + 1}/{n_rounds} {arm:6s} {ph['total']:8.3f} s"
                f"  peak {_fmt_mib(pm.bytes)} MiB" + ("  (warm-up)" if r < args.warmup else ""),
                file=sys.stderr,
                flush=True,
            )
    out_arms = {}
    for arm, d in res.items():
        phase_names = d["phases"][0].keys() if d["phases"] else []
        out_arms[arm] = {
            "seconds": d["seconds"],
            "median_seconds": _median(d["seconds"]),
            "peak_bytes": d["peak_bytes"],
            "median_peak_bytes": _median(d["peak_bytes"]),
            "phase_median_seconds": {n: _median([p[n] for p in d["phases"]]) for n in phase_names},
            "loss": d["loss"][-1] if d["loss"] else None,
        }
    result: dict[str, Any] = {"config": info, "arms": out_arms}
    if not args.no_loss_phase and "taopd" in arms:
        result["loss_phase"] = bench.loss_phase()
    if "taopd-bf16" in arms:
        result["bf16_selection_agreement"] = bench.bf16_agreement(args.agreement_seeds)
    result["targets"] = _targets(result)
    if args.profile:
        result["profiles"] = {}
        for arm in args.profile:
            if arm in arms:
                result["profiles"][arm] = _profile(bench, arm, args.profile_top)
    del bench, student, teacher
    gc.collect()
    return result


def _flops(student, teacher, shape: Shape, vocab: int, ratio: float) -> dict[str, float]:
    """MFLOP per loss position (multiply-adds x 2) by the accounting of benchmarks/README.md.

    Bodies: 2 x non-embedding parameters per token forward, 3x that for forward + backward
    (attention's T x T products left out). Exact scoring: both models' projections through the
    vocabulary at every position. TA-OPD's loss at `ratio`: the kept rows' student and teacher
    projections, the gradients of the hidden states and of the lm_head.
    """

    def body(m) -> int:
        return sum(p.numel() for p in m.model.parameters()) - m.model.embed_tokens.weight.numel()

    per_body = shape.batch * (shape.prompt + shape.tokens) / (shape.batch * shape.tokens)
    d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
    out = {
        "teacher_forward": 2 * body(teacher) * per_body / 1e6,
        "student_forward_backward": 6 * body(student) * per_body / 1e6,
        "scoring": 2 * vocab * (d_s + d_t) / 1e6,
        "loss": ratio * vocab * (2 * d_s + 2 * d_t + 4 * d_s) / 1e6,
    }
    out["floor"] = out["teacher_forward"] + out["student_forward_backward"]
    out["bound_vs_floor"] = (out["floor"] + out["scoring"] + out["loss"]) / out["floor"]
    return out


def _targets(result: dict) -> list[dict[str, Any]]:
    """The issue's targets (#17) with the measured values of this run."""
    arms, cfg = result["arms"], result["config"]
    med = {a: d["median_seconds"] for a, d in arms.items()}
    out = []

    def add(name, value, goal, ok):
        out.append({"target": name, "value": value, "goal": goal, "met": ok})

    big_vocab = cfg["vocab"] > 100_000
    for arm, tag in (("taopd", "(b)"), ("taopd-bf16", "(b')")):
        if arm not in med:
            continue
        if "trl" in med:
            v, goal = med["trl"] / med[arm], 3.0 if big_vocab else 2.0
            add(f"{tag} faster than (c) by", f"{v:.2f}x", f">= {goal:g}x", v >= goal)
        if "floor" in med and not big_vocab:
            bound = cfg["mflop_per_position"]["bound_vs_floor"]
            v = med[arm] / med["floor"] / bound
            add(
                f"{tag} vs the FLOP bound of exact scoring ({bound:.2f}x (d))",
                f"{v:.2f}x ({med[arm] / med['floor']:.2f}x (d))",
                "<= 1.1x",
                v <= 1.1,
            )
    lp = result.get("loss_phase")
    if lp:
        names = list(lp)
        sel, dense = lp[names[0]]["peak_bytes"], lp[names[2]]["peak_bytes"]
        if sel is not None and dense:
            v = sel / dense
            add(
                "peak memory of (b)'s loss phase vs a full-logit loss",
                f"{v:.3f}",
                "<= 0.1",
                v <= 0.1,
            )
    agree = result.get("bf16_selection_agreement")
    if agree:
        v = min(agree.values())
        add("(b') keeps (b)'s kept positions, worst seed", f"{v:.1%}", ">= 95%", v >= 0.95)
    return out


def _fmt_mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / MiB:,.0f}"


def _fmt_s(s: float | None) -> str:
    return "n/a" if s is None else f"{s:.3f}"


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"# One distillation step: {meta['device']}, torch {meta['torch']}, "
        f"{meta['threads']} threads, {meta['repeats']} repeats (median), "
        f"TA-OPD ratio {meta['ratio']}, k={meta['k']}",
        "",
    ]
    for name, r in results.items():
        c, arms = r["config"], r["arms"]
        lines += [
            f"## {name}: {c['description']}",
            "",
            f"batch {c['batch']} x {c['response_tokens']} response tokens "
            f"({c['loss_positions']} loss positions, {c['body_tokens']} body tokens), "
            f"student {c['student_params'] / 1e6:.1f} M params, "
            f"teacher {c['teacher_params'] / 1e6:.1f} M params.",
            "",
        ]
        if "note" in c:
            lines += [f"Note: {c['note']}", ""]
        floor = arms.get("floor", {}).get("median_seconds")
        trl = arms.get("trl", {}).get("median_seconds")
        lines += [
            "| arm | step s (median) | min - max s | peak MiB (median) | vs floor | TRL / arm "
            "| loss |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for arm, d in arms.items():
            m = d["median_seconds"]
            lo, hi = (min(d["seconds"]), max(d["seconds"])) if d["seconds"] else (None, None)
            vs_floor = f"{m / floor:.2f}x" if floor and m else "-"
            vs_trl = f"{trl / m:.2f}x" if trl and m else "-"
            lines.append(
                f"| {ARM_TITLES[arm]} | {_fmt_s(m)} | {_fmt_s(lo)} - {_fmt_s(hi)} "
                f"| {_fmt_mib(d['median_peak_bytes'])} | {vs_floor} | {vs_trl} "
                f"| {d['loss']:.4f} |"
            )
        for arm, tag in (("taopd", "(b)"), ("taopd-bf16", "(b')")):
            if arm not in arms:
                continue
            ph, tot = arms[arm]["phase_median_seconds"], arms[arm]["median_seconds"]
            lines += [
                "",
                f"Breakdown of {tag}, median seconds per phase:",
                "",
                "| phase | seconds | share of step |",
                "|---|---:|---:|",
            ]
            for p in ("bodies", "scoring", "selection", "loss", "backward"):
                if p in ph:
                    lines.append(f"| {p} | {ph[p]:.3f} | {ph[p] / tot:.1%} |")
        if "bf16_selection_agreement" in r:
            per_seed = ", ".join(
                f"seed {k}: {v:.1%}" for k, v in r["bf16_selection_agreement"].items()
            )
            lines += [
                "",
                f"Positions (b) keeps that (b') also keeps (bf16 vs fp32 scoring projections, "
                f"same batch): {per_seed}.",
            ]
        fl = c["mflop_per_position"]
        lines += [
            "",
            "MFLOP per loss position: teacher forward {teacher_forward:.0f}, student forward + "
            "backward {student_forward_backward:.0f} (= floor {floor:.0f}), exact scoring "
            "{scoring:.0f}, TA-OPD loss {loss:.1f}: bound = {bound_vs_floor:.2f}x (d).".format(
                **fl
            ),
        ]
        if r.get("loss_phase"):
            lines += [
                "",
                "Loss phase alone (hidden states -> loss -> grads of hidden states and "
                "lm_head), one run each:",
                "",
                "| loss | seconds | peak MiB |",
                "|---|---:|---:|",
            ]
            for n, d in r["loss_phase"].items():
                lines.append(f"| {n} | {d['seconds']:.3f} | {_fmt_mib(d['peak_bytes'])} |")
        if r.get("targets"):
            lines += ["", "| target | measured | goal | met |", "|---|---:|---:|:-:|"]
            for t in r["targets"]:
                lines.append(
                    f"| {t['target']} | {t['value']} | {t['goal']} "
                    f"| {'yes' if t['met'] else 'NO'} |"
                )
        for arm, table in r.get("profiles", {}).items():
            lines += [
                "",
                f"torch.profiler, one step of {ARM_TITLES[arm]}, top ops:",
                "",
                "```",
                table.rstrip(),
                "```",
            ]
        lines.append("")
    lines += [
        "Peak MiB: " + meta["memory_method"],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shapes",
        default="smollm2,qwen-vocab",
        help=f"comma-separated, from {', '.join(SHAPES)} (default: smollm2,qwen-vocab)",
    )
    p.add_argument(
        "--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS)
    )
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ratio", type=float, default=0.05, help="TA-OPD share of positions kept")
    p.add_argument("--k", type=int, default=16, help="top-K of the union signals")
    p.add_argument("--score-chunk", type=int, default=512, help="signals_from_hidden chunk_size")
    p.add_argument("--loss-chunk", type=int, default=1024, help="selective_head_loss chunk_size")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument(
        "--no-loss-phase",
        action="store_true",
        help="skip the loss-phase memory comparison (it builds full [N, V] logits)",
    )
    p.add_argument(
        "--agreement-seeds",
        default="0",
        help="batch seeds on which (b') and (b) selections are compared (default 0: the timed "
        "batch)",
    )
    p.add_argument("--profile", default="", help="arms to profile once with torch.profiler")
    p.add_argument("--profile-top", type=int, default=15)
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.profile = [a.strip() for a in args.profile.split(",") if a.strip()]
    args.agreement_seeds = [int(x) for x in args.agreement_seeds.split(",") if x.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for name in shapes:
        if name not in SHAPES:
            p.error(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    for arm in args.arms + args.profile:
        if arm not in ARMS:
            p.error(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pm = PeakMemory(device)
    meta = {
        "device": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "ratio": args.ratio,
        "k": args.k,
        "score_chunk": args.score_chunk,
        "loss_chunk": args.loss_chunk,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "memory_method": (
            "torch.cuda.max_memory_allocated minus the allocation before the step"
            if device.type == "cuda"
            else "resident-set high-water mark of the step (VmHWM after the step minus VmRSS "
            "before it, after gc + malloc_trim, high-water mark reset via /proc/self/clear_refs)"
            if pm.available
            else "not available on this platform"
        ),
    }
    try:
        import trl

        meta["trl"] = trl.__version__
    except ImportError:
        meta["trl"] = None
    results = {}
    for name in shapes:
        results[name] = run_shape(SHAPES[name], args, device)
    meta["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(markdown(results, meta))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"meta": meta, "shapes": results},
                indent=2,
                default=lambda o: None if o != o else str(o),
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

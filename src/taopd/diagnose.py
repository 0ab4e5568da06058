"""The fixed-context diagnostic (arXiv 2605.26844, Eq. 1): which tokens' losses actually help?

1. Bank: the student's own rollouts (temperature 1) on held-out prompts, frozen in `bank.pt`,
   so θ0 and θτ are scored on the same prefixes.
2. θ0 on the bank: every per-position signal (`scores.signals_from_hidden`, chunked, never
   [B, T, V]) and KL0 = KL(p_T‖p_θ0) over the full vocabulary (`TokenSignals.forward_kl`).
3. Update: `opd` runs a short OPD on the training split with `train.Trainer.train_step`
   (full-token by default, `diagnose.update_strategy`), writing its run to `update/`;
   `single-step` takes, for each of `n_single` random positions t, one SGD step of size η on
   ℓ_t = KL(p_θ‖p_T)(c_t) alone and restores the weights afterwards.
4. Gain: `opd`: G_t = KL0(c_t) − KLτ(c_t) per position (`--relative`: divided by KL0).
   `single-step`: G_t = mean over the bank's positions of KL0 − KLτ after the step on ℓ_t (the
   fixed-context improvement L_fix(θ0) − L_fix(θτ)); also the gain at t itself (`gain_self`) and
   the first-order prediction η⟨∇L_fix, ∇ℓ_t⟩ of Proposition 1 (`first_order`).

Cost of `single-step`: per position one forward/backward of one context plus one forward of the
whole bank (the bank forward dominates: n_single × a θ0-scoring pass), and two extra copies of the
trainable weights in memory (the originals and ∇L_fix). Keep `n_single` small on CPU.

Statistics over the positions with a gain (all valid positions in `opd` mode, the updated ones in
`single-step` mode), each with a prompt-clustered bootstrap (prompts resampled with replacement):
- matched top-N: for each selector, the mean gain of its top N = ⌈ratio·|I|⌉ positions of the
  whole bank (`selection.strategy_scores` + `selection.select`). In each bootstrap draw the Eq. 11
  normalization and the selection are recomputed on the resampled bank (not kept fixed).
- standardized OLS of the gain (z-scored predictors and gain, numpy lstsq) on
  (H̃, D̃, H̃·D̃, position, teacher entropy) ("base"), plus C̃ ("+C"), and with D̃ replaced by
  (D^L = D̃C̃, D^I = D̃(1−C̃)) ("split"; the H̃·D̃ term is kept). H̃, D̃, C̃ are normalized once
  over the analysed positions; bootstrap draws resample rows and refit.
- Spearman rank correlation of each signal with the gain (numpy ranks, ties averaged).

Eq. 11 clips each signal at its bank Q0.95, so about 5% of positions tie at 1 for a single-signal
selector (entropy, divergence, reverse_kl, compatibility); at ρ ≤ 0.05 those selectors keep the
earliest tied positions (the tie rule of `select`), while products and sums (teachability,
incompatible, tip) still rank within the top 5%.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import load_rollout, save_rollout
from .config import Config
from .errors import UserError
from .loss import per_token_loss, selective_head_loss
from .models import lm_head, load_tokenizer
from .rollout import Rollout, response_hidden
from .scores import TokenSignals, normalize, signals_from_hidden
from .selection import select, strategy_scores, top_n

N_TOKEN_VIEW = 8  # bank contexts shown in the report's token view

__all__ = [
    "BANK_FILE",
    "REGRESSION_MODELS",
    "analysis_table",
    "bootstrap_draws",
    "correlations",
    "load_bank",
    "make_bank",
    "matched_topn",
    "ols_standardized",
    "rankdata",
    "regressions",
    "run_diagnose",
    "save_bank",
    "score_bank",
    "single_step_gain",
    "spearman",
]

BANK_FILE = "bank.pt"
SIGNAL_FIELDS = tuple(f.name for f in fields(TokenSignals))
REL_EPS = 1e-12  # relative gain (KL0 − KLτ) / (KL0 + REL_EPS), as released
REGRESSION_MODELS: dict[str, list[str]] = {
    "base": ["H", "D", "H*D", "pos", "Ht"],
    "+C": ["H", "D", "H*D", "pos", "Ht", "C"],
    "split": ["H", "D_L", "D_I", "pos", "Ht"],
}
"""The released regressions. Terms: H, D, C, Ht, pos are H̃ (student entropy), D̃ (the analysis
divergence, full-vocabulary KL(p_T‖p_θ0) by default), C̃ (exact compatibility mass), teacher
entropy and response position, each normalized (Eq. 11, 5/95) over the bank; D_L = D̃C̃ and
D_I = D̃(1−C̃). The split model has no H̃·D̃ term: D_L + D_I = D̃, so H̃·D̃ beside them is nearly
collinear with the split and can flip its conclusion (all columns z-scored for the fit)."""
INTERACTION_MODEL = {"split+H*D": ["H", "D_L", "D_I", "H*D", "pos", "Ht"]}
"""taopd's earlier split model, kept as an option (`diagnose.split_interaction`)."""
REGRESSION_TERMS = {
    "H": "student entropy H̃ (full vocabulary), Eq. 11-normalized over the bank",
    "D": "analysis divergence D̃ (diagnose.divergence), Eq. 11-normalized",
    "C": "compatibility mass C̃ = Σ_{v∈S^S} p_T(v) (exact), Eq. 11-normalized",
    "Ht": "teacher entropy, Eq. 11-normalized",
    "pos": "position in the response, Eq. 11-normalized",
    "H*D": "H̃·D̃",
    "D_L": "learnable disagreement D^L = D̃·C̃",
    "D_I": "incompatible disagreement D^I = D̃·(1 − C̃)",
}
DIVERGENCES = {"forward_kl": "forward_kl", "union": "disagreement"}
"""diagnose.divergence → the signal used as D in the analysis: the released full-vocabulary
KL(p_T‖p_θ0), or taopd's training signal, Eq. 9's union KL."""
CORRELATION_SIGNALS = (
    "student_entropy", "teacher_entropy", "disagreement", "compatibility", "compatibility_lb",
    "overlap", "reverse_kl", "forward_kl", "log_ratio", "teachability", "incompatible", "tip",
    "position",
)  # fmt: skip
DECILE_SIGNALS = (
    "student_entropy", "teacher_entropy", "disagreement", "compatibility", "teachability",
    "incompatible", "reverse_kl", "forward_kl", "log_ratio", "position",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The bank


def save_bank(path: Path, roll: Rollout, prompts: list[str], meta: dict[str, Any]) -> None:
    """Write the frozen bank: the Rollout tensors, texts, prompts and `meta` (a plain dict)."""
    save_rollout(path, roll, prompts=list(prompts), meta=meta)


def load_bank(path: str | Path) -> tuple[Rollout, list[str], dict[str, Any]]:
    """(rollout, prompts, meta) of a bank written by `save_bank` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"bank {path} does not exist (a bank.pt written by `taopd diagnose`)")
    roll, data = load_rollout(path, "bank")
    return roll, list(data.get("prompts", [])), dict(data.get("meta", {}))


def make_bank(
    trainer: Any,
    n_contexts: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> tuple[Rollout, list[str], dict[str, Any]]:
    """Sample one temperature-1 rollout of the (θ0) student per held-out test prompt."""
    cfg: Config = trainer.cfg
    examples = trainer.task.examples("test", n_contexts, seed=cfg.task.seed)
    if not examples:
        raise UserError("the task gave no test examples for the bank")
    prompts = [trainer.render(ex.question) for ex in examples]
    model = trainer.acc.unwrap_model(trainer.student)
    parts = []
    chunks = range(0, len(prompts), batch_size)
    for i in tqdm(chunks, desc="bank: sampling", disable=not progress):
        parts.append(
            trainer.sampler(
                model,
                trainer.tokenizer,
                prompts[i : i + batch_size],
                max_new_tokens=max_new_tokens,
                temperature=1.0,
                top_p=1.0,
                seed=seed * 1_000_003 + i,
            ).to("cpu")
        )
    roll = _concat_rollouts(parts, trainer.tokenizer.pad_token_id)
    meta = {
        "student": cfg.student,
        "task": cfg.task.name or cfg.task.path,
        "split": "test",
        "n_contexts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0,
        "seed": seed,
        "questions": [ex.question for ex in examples],
        "answers": [ex.answer for ex in examples],
    }
    return roll, prompts, meta


def _concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout of several: prompts re-aligned to the widest left-padded block, responses
    right-padded to the longest (the layout `generate` gives one batch)."""
    if len(parts) == 1:
        return parts[0]
    p = max(r.prompt_len for r in parts)
    width = max(r.input_ids.shape[1] - r.prompt_len for r in parts)
    ids, att, resp = [], [], []
    for r in parts:
        left, right = p - r.prompt_len, width - (r.input_ids.shape[1] - r.prompt_len)
        pad = (left, right)
        ids.append(torch.nn.functional.pad(r.input_ids, pad, value=pad_id))
        att.append(torch.nn.functional.pad(r.attention_mask, pad, value=0))
        resp.append(torch.nn.functional.pad(r.response_mask, pad, value=False))
    texts = [t for r in parts for t in r.texts]
    return Rollout(torch.cat(ids), torch.cat(att), torch.cat(resp), p, texts)


# ---------------------------------------------------------------------------------------------
# Scoring


def _rows(roll: Rollout, rows: slice) -> Rollout:
    return Rollout(
        roll.input_ids[rows],
        roll.attention_mask[rows],
        roll.response_mask[rows],
        roll.prompt_len,
        roll.texts[rows],
    )


@torch.no_grad()
def score_bank(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    bank: Rollout,
    vocab_size: int,
    k: int = 16,
    batch_size: int = 32,
    chunk_size: int = 512,
    teacher_cache: list[Tensor] | None = None,
    desc: str = "bank: scoring",
    progress: bool = True,
) -> TokenSignals:
    """All signals of `student` vs `teacher` on the bank's response positions, each [B, R].

    `teacher_cache` (a list, filled on the first call) keeps the teacher's response hidden
    states per batch so later calls skip the teacher forward. Temperature 1.
    """
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    p = bank.prompt_len
    w_s, w_t = lm_head(student), lm_head(teacher)
    out: list[TokenSignals] = []
    starts = list(range(0, len(bank), batch_size))
    for j, i in enumerate(tqdm(starts, desc=desc, disable=not progress, leave=False)):
        sub = _rows(bank, slice(i, i + batch_size)).to(device)
        h_s = response_hidden(student, sub)
        if teacher_cache is not None and j < len(teacher_cache):
            h_t = teacher_cache[j].to(device)
        else:
            h_t = response_hidden(teacher, sub)
            if teacher_cache is not None:
                teacher_cache.append(h_t)
        out.append(
            signals_from_hidden(
                h_s,
                w_s,
                h_t,
                w_t,
                tokens=sub.input_ids[:, p:],
                k=k,
                valid=sub.response_mask[:, p:],
                vocab_size=vocab_size,
                chunk_size=chunk_size,
            )
        )
    student.train(was_training)
    names = [n for n, _ in out[0].items()]
    return TokenSignals(**{n: torch.cat([getattr(s, n) for s in out]).cpu() for n in names})


# ---------------------------------------------------------------------------------------------
# Single-step updates


def _params(model: torch.nn.Module) -> list[Tensor]:
    return [q for q in model.parameters() if q.requires_grad]


@torch.no_grad()
def _sgd(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float) -> None:
    for q, g in zip(params, grads, strict=True):
        q.sub_(lr * g)


def single_step_gain(
    params: Sequence[Tensor],
    step_loss: Callable[[], Tensor],
    fixed_kl: Callable[[], Tensor],
    lr: float,
    kl0: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Per-position gain KL0 − KLτ of one SGD step θτ = θ0 − lr·∇`step_loss`; weights restored.

    `fixed_kl()` returns the per-position KL(p_T‖p_θ) of the current parameters on the fixed
    contexts (no grad needed); `kl0` is its value at θ0 (computed when None). Returns the gains
    and the gradient of `step_loss` (for a first-order comparison).
    """
    params = list(params)
    if kl0 is None:
        with torch.no_grad():
            kl0 = fixed_kl()
    saved = [q.detach().clone() for q in params]
    loss = step_loss()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(q) if g is None else g for q, g in zip(params, grads, strict=True)]
    try:
        _sgd(params, grads, lr)
        with torch.no_grad():
            kl_tau = fixed_kl()
    finally:
        with torch.no_grad():
            for q, s in zip(params, saved, strict=True):
                q.copy_(s)
    return kl0 - kl_tau, grads


def _fixed_kl_grad(
    trainer: Any, bank: Rollout, teacher_cache: list[Tensor], batch_size: int, progress: bool
) -> list[Tensor]:
    """∇ L_fix = ∇ mean_t KL(p_T‖p_θ)(c_t) over the bank's valid positions (selective head)."""
    student, cfg = trainer.student, trainer.cfg
    device = next(student.parameters()).device
    params = _params(student)
    p = bank.prompt_len
    n_valid = float(bank.response_mask[:, p:].sum())
    w_s, w_t = lm_head(student), lm_head(trainer.teacher)
    student.zero_grad(set_to_none=True)
    starts = list(range(0, len(bank), batch_size))
    for j, i in enumerate(
        tqdm(starts, desc="single-step: ∇L_fix", disable=not progress, leave=False)
    ):
        sub = _rows(bank, slice(i, i + batch_size)).to(device)
        valid = sub.response_mask[:, p:]
        if not bool(valid.any()):
            continue
        h = response_hidden(student, sub)
        loss = selective_head_loss(
            h,
            w_s,
            valid,
            teacher_hidden=teacher_cache[j].to(device),
            teacher_weight=w_t,
            kind="forward_kl",
            normalizer=n_valid,
            vocab_size=trainer.vocab_size,
            chunk_size=cfg.loss.chunk_size,
        )
        loss.backward()
    grads = [torch.zeros_like(q) if q.grad is None else q.grad.detach().clone() for q in params]
    student.zero_grad(set_to_none=True)
    return grads


def _single_step(
    trainer: Any,
    bank: Rollout,
    sig0: TokenSignals,
    teacher_cache: list[Tensor],
    dcfg: Any,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Gains of one SGD step on each of `n_single` random valid positions (see module doc)."""
    student, cfg = trainer.student, trainer.cfg
    device = next(student.parameters()).device
    p = bank.prompt_len
    valid = bank.response_mask[:, p:]
    flat = valid.reshape(-1).nonzero().squeeze(-1)
    gen = torch.Generator().manual_seed(dcfg.seed)
    n = flat.numel() if dcfg.n_single == 0 else min(dcfg.n_single, flat.numel())
    chosen = flat[torch.randperm(flat.numel(), generator=gen)[:n]].sort().values
    width = valid.shape[1]
    kl0 = sig0.forward_kl
    shape = tuple(valid.shape)
    out = {
        name: np.full(shape, np.nan)
        for name in ("gain", "gain_absolute", "gain_relative", "gain_self", "first_order")
    }
    student.eval()  # deterministic forward (no dropout) for the step and the measurements
    params = _params(student)
    g_fix = _fixed_kl_grad(trainer, bank, teacher_cache, dcfg.batch_size, progress)
    w_s, w_t = lm_head(student), lm_head(trainer.teacher)
    l0 = float(kl0[valid].mean())

    def fixed_kl() -> Tensor:
        sig = score_bank(
            student,
            trainer.teacher,
            bank,
            trainer.vocab_size,
            k=1,
            batch_size=dcfg.batch_size,
            chunk_size=cfg.selection.chunk_size,
            teacher_cache=teacher_cache,
            progress=False,
        )
        return sig.forward_kl

    bs = dcfg.batch_size
    for flat_idx in tqdm(chosen.tolist(), desc="single-step updates", disable=not progress):
        b, j = divmod(flat_idx, width)
        row = _rows(bank, slice(b, b + 1)).to(device)
        h_t = teacher_cache[b // bs][b % bs, j].to(device)

        def step_loss(row: Rollout = row, j: int = j, h_t: Tensor = h_t) -> Tensor:
            h = response_hidden(student, row)[0, j]
            s_logits = (h @ w_s[: trainer.vocab_size].T).unsqueeze(0)
            t_logits = (h_t @ w_t[: trainer.vocab_size].T.to(h_t.dtype)).unsqueeze(0)
            return per_token_loss(s_logits, t_logits, "reverse_kl").sum()

        gains, grads = single_step_gain(params, step_loss, fixed_kl, dcfg.single_lr, kl0=kl0)
        g_mean = float(gains[valid].mean())
        lt = l0 - g_mean
        out["gain_absolute"][b, j] = g_mean
        out["gain_relative"][b, j] = (l0 - lt) / (l0 + REL_EPS)
        out["gain_self"][b, j] = float(gains[b, j])
        dot = sum(
            float((gf.double() * g.double()).sum()) for gf, g in zip(g_fix, grads, strict=True)
        )
        out["first_order"][b, j] = dcfg.single_lr * dot
    key = "gain_relative" if dcfg.relative else "gain_absolute"
    out["gain"] = out[key].copy()
    return out


def _opd_update(trainer: Any, progress: bool) -> dict[str, Any]:
    """A short OPD run with the trainer's own step (no evaluation); θτ stays in `trainer`."""
    steps = trainer.cfg.train.steps
    t0 = time.perf_counter()
    bar = tqdm(
        total=steps, desc=f"OPD update ({trainer.cfg.selection.strategy})", disable=not progress
    )
    last: dict[str, Any] = {}
    while trainer.step < steps:
        metrics = trainer.train_step()
        if metrics is not None:
            trainer._log(metrics)
            last = metrics
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", kept=metrics["n_selected"])
        bar.update(1)
    bar.close()
    return {
        "update_steps": trainer.step,
        "update_strategy": trainer.cfg.selection.strategy,
        "update_ratio": trainer.cfg.selection.ratio,
        "update_lr": trainer.cfg.optim.lr,
        "update_batch_size": trainer.cfg.train.batch_size,
        "update_tokens_trained": trainer.tokens_trained,
        "update_last_loss": last.get("loss"),
        "update_seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# Statistics (numpy; positions are rows, `clusters` their prompt ids)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `x` with ties given their average rank (scipy's 'average')."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN if either side is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def bootstrap_draws(clusters: np.ndarray, n_draws: int, seed: int = 0) -> list[np.ndarray]:
    """Row indices of `n_draws` prompt-clustered resamples (clusters drawn with replacement)."""
    clusters = np.asarray(clusters)
    uniq, inverse = np.unique(clusters, return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(uniq)))])
    members = [order[bounds[c] : bounds[c + 1]] for c in range(len(uniq))]
    rng = np.random.default_rng(seed)
    return [
        np.concatenate([members[c] for c in rng.integers(0, len(uniq), len(uniq))])
        for _ in range(n_draws)
    ]


def _interval(values: Sequence[float]) -> tuple[float | None, float | None]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return None, None
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def _num(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def relative_gain(kl0: np.ndarray, kl_tau: np.ndarray) -> np.ndarray:
    """The released gain: the relative forward-KL reduction (KL0 − KLτ) / (KL0 + 1e-12)."""
    kl0 = np.asarray(kl0, dtype=float)
    return (kl0 - np.asarray(kl_tau, dtype=float)) / (kl0 + REL_EPS)


def winsorize(x: np.ndarray, q: float = 0.01) -> np.ndarray:
    """`x` clipped to its [q, 1 − q] quantiles (linear interpolation; NaNs kept); q = 0: as is."""
    x = np.asarray(x, dtype=float)
    if not 0.0 <= q < 0.5:
        raise ValueError(f"winsorize: q must be in [0, 0.5), got {q}")
    finite = np.isfinite(x)
    if q == 0 or not finite.any():
        return x.copy()
    lo, hi = np.quantile(x[finite], [q, 1.0 - q])
    return np.where(finite, np.clip(x, lo, hi), x)


def analysis_table(
    signals: dict[str, np.ndarray], divergence: str = "forward_kl"
) -> dict[str, np.ndarray]:
    """Raw signals of the analysed positions plus the columns the statistics use.

    D is the analysis divergence (`DIVERGENCES`: full-vocabulary KL(p_T‖p_θ0) as released, or
    Eq. 9's union KL). Adds H, D, C, Ht, pos (Eq. 11-normalized over these positions),
    D_L = teachability = D̃C̃, D_I = incompatible = D̃(1−C̃), tip = H̃+D̃−H̃D̃, H*D, and q3
    (H̃ ≤ median and D̃ ≥ median, TIP's confident-but-wrong quadrant).
    """
    if divergence not in DIVERGENCES:
        raise UserError(f"diagnose.divergence must be one of {', '.join(DIVERGENCES)}")
    t = {k: np.asarray(v, dtype=float) for k, v in signals.items()}
    n = len(t["student_entropy"])
    valid = torch.ones(n, dtype=torch.bool)

    def norm(name: str) -> np.ndarray:
        if name not in t:
            return np.zeros(n)
        return normalize(torch.as_tensor(t[name], dtype=torch.float64), valid).numpy()

    t["D_raw"] = t[DIVERGENCES[divergence]]
    h, d, c = norm("student_entropy"), norm("D_raw"), norm("compatibility")
    t.update(
        {
            "H": h,
            "D": d,
            "C": c,
            "Ht": norm("teacher_entropy"),
            "pos": norm("position"),
            "H*D": h * d,
            "D_L": d * c,
            "D_I": d * (1 - c),
            "teachability": d * c,
            "incompatible": d * (1 - c),
            "tip": h + d - h * d,
            "q3": ((h <= np.median(h)) & (d >= np.median(d))).astype(float),
        }
    )
    return t


def _token_signals(table: dict[str, np.ndarray], idx: np.ndarray | None) -> TokenSignals:
    """The table's raw signals as TokenSignals, with `disagreement` = the analysis divergence,
    so every selector ranks by the same D the statistics use."""

    def col(name: str) -> Tensor:
        name = "D_raw" if name == "disagreement" and "D_raw" in table else name
        x = table[name] if idx is None else table[name][idx]
        return torch.as_tensor(x, dtype=torch.float64)

    return TokenSignals(**{n: col(n) for n in SIGNAL_FIELDS if n in table})


def matched_count(ratio: float, n_positions: int) -> int:
    """The released matched count n = round(ratio·N) (half up), at least 1."""
    return max(1, min(n_positions, math.floor(ratio * n_positions + 0.5)))


def _topn_masks(
    table: dict[str, np.ndarray],
    selectors: Sequence[str],
    ratios: Sequence[float],
    idx: np.ndarray | None,
    seed: int,
) -> dict[str, dict[float, np.ndarray]]:
    """selector → ratio → bool mask of its top round(ratio·N) positions (of the rows `idx`)."""
    sig = _token_signals(table, idx)
    n_rows = len(sig.student_entropy)
    valid = torch.ones(n_rows, dtype=torch.bool)
    out: dict[str, dict[float, np.ndarray]] = {}
    for sel in selectors:
        gen = torch.Generator().manual_seed(seed)
        scores = strategy_scores(sel, sig, valid, gen)
        out[sel] = {r: top_n(scores, valid, matched_count(r, n_rows)).numpy() for r in ratios}
    return out


def _topn_means(
    table: dict[str, np.ndarray],
    gain: np.ndarray,
    selectors: Sequence[str],
    ratios: Sequence[float],
    idx: np.ndarray | None,
    seed: int,
) -> dict[str, dict[float, tuple[float, int]]]:
    g = gain if idx is None else gain[idx]
    masks = _topn_masks(table, selectors, ratios, idx, seed)
    return {
        sel: {
            r: (float(g[m].mean()) if m.any() else float("nan"), int(m.sum()))
            for r, m in per.items()
        }
        for sel, per in masks.items()
    }


def matched_topn(
    table: dict[str, np.ndarray],
    gains: np.ndarray | dict[str, np.ndarray],
    clusters: np.ndarray,
    selectors: Sequence[str],
    ratios: Sequence[float],
    n_boot: int = 200,
    seed: int = 0,
) -> Any:
    """Matched top-N: every selector keeps its top n = round(ratio·N) positions.

    For each gain (one array, or {name: array} sharing the selections): selector → ratio ("0.05")
    → {mean, low, high, n, share_of_gain, lift, q3_fraction}: the mean gain of the kept
    positions with a 95% prompt-clustered bootstrap interval (each draw resamples prompts and
    recomputes the normalization and the selection), the kept share of the total gain, the gain
    per kept share (lift = kept mean / bank mean) and the share of kept positions in Q3."""
    single = not isinstance(gains, dict)
    named = {"gain": gains} if single else gains
    named = {k: np.asarray(v, dtype=float) for k, v in named.items()}
    point = _topn_masks(table, selectors, ratios, None, seed)
    boot: dict[str, dict[str, dict[float, list[float]]]] = {
        k: {sel: {r: [] for r in ratios} for sel in selectors} for k in named
    }
    for i, idx in enumerate(bootstrap_draws(clusters, n_boot, seed)):
        masks = _topn_masks(table, selectors, ratios, idx, seed + 1 + i)
        for k, g in named.items():
            gi = g[idx]
            for sel in selectors:
                for r in ratios:
                    m = masks[sel][r]
                    boot[k][sel][r].append(float(gi[m].mean()) if m.any() else float("nan"))
    q3 = table.get("q3")
    out: dict[str, Any] = {}
    for k, g in named.items():
        total, mean_all = float(g.sum()), float(g.mean())
        out[k] = {}
        for sel in selectors:
            out[k][sel] = {}
            for r in ratios:
                m = point[sel][r]
                mean = float(g[m].mean()) if m.any() else float("nan")
                lo, hi = _interval(boot[k][sel][r])
                out[k][sel][f"{r:g}"] = {
                    "mean": _num(mean),
                    "low": lo,
                    "high": hi,
                    "n": int(m.sum()),
                    "share_of_gain": _num(float(g[m].sum()) / total) if total else None,
                    "lift": _num(mean / mean_all) if mean_all else None,
                    "q3_fraction": _num(float(q3[m].mean())) if q3 is not None else None,
                }
    return out["gain"] if single else out


def ols_standardized(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients of z-scored y on z-scored columns of x (with intercept), and R².

    Constant columns get coefficient 0 (lstsq's minimum-norm solution)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)

    def z(a: np.ndarray) -> np.ndarray:
        sd = a.std(axis=0)
        return (a - a.mean(axis=0)) / np.where(sd > 0, sd, 1.0)

    xz, yz = z(x), z(y)
    design = np.column_stack([np.ones(len(yz)), xz])
    beta, *_ = np.linalg.lstsq(design, yz, rcond=None)
    resid = yz - design @ beta
    ss = float((yz * yz).sum())
    r2 = 1.0 - float((resid * resid).sum()) / ss if ss > 0 else float("nan")
    return beta[1:], r2


def regressions(
    table: dict[str, np.ndarray],
    gain: np.ndarray,
    clusters: np.ndarray,
    models: dict[str, list[str]] | None = None,
    n_boot: int = 200,
    seed: int = 0,
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, float]]:
    """{model: {coef: {coef, low, high}}} of standardized OLS fits with cluster-bootstrap 95%
    intervals (prompts resampled, normalized columns kept), and {model: R²}."""
    models = models or REGRESSION_MODELS
    draws = bootstrap_draws(clusters, n_boot, seed)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    r2s: dict[str, float] = {}
    for name, cols in models.items():
        x = np.column_stack([table[c] for c in cols])
        coef, r2 = ols_standardized(x, gain)
        boot = np.array([ols_standardized(x[i], gain[i])[0] for i in draws]).reshape(-1, len(cols))
        out[name] = {}
        for j, c in enumerate(cols):
            lo, hi = _interval(boot[:, j].tolist())
            out[name][c] = {"coef": _num(coef[j]), "low": lo, "high": hi}
        r2s[name] = r2
    return out, r2s


def correlations(
    table: dict[str, np.ndarray],
    gain: np.ndarray,
    clusters: np.ndarray,
    names: Sequence[str] = CORRELATION_SIGNALS,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, dict[str, float | None]]:
    """signal → {spearman, spearman_low, spearman_high} with the gain (cluster bootstrap)."""
    draws = bootstrap_draws(clusters, n_boot, seed)
    out: dict[str, dict[str, float | None]] = {}
    for name in names:
        if name not in table:
            continue
        x = table[name]
        lo, hi = _interval([spearman(x[i], gain[i]) for i in draws])
        out[name] = {"spearman": _num(spearman(x, gain)), "spearman_low": lo, "spearman_high": hi}
    return out


# ---------------------------------------------------------------------------------------------
# Outputs


def _ci_text(e: dict[str, Any], key: str = "mean", fmt: str = ".4g") -> str:
    if e.get(key) is None:
        return "n/a"
    text = format(e[key], fmt)
    if e.get("low") is not None:
        text += f" [{e['low']:{fmt}}, {e['high']:{fmt}}]"
    return text


def _topn_markdown(topn: dict) -> str:
    from .report import write_markdown_table

    ratios = list(next(iter(topn.values())).keys())
    rows = []
    for sel, per in topn.items():
        row = {"selector": sel}
        for r in ratios:
            e = per[r]
            lift = "n/a" if e.get("lift") is None else f"{e['lift']:.2f}"
            q3 = "n/a" if e.get("q3_fraction") is None else f"{e['q3_fraction']:.2f}"
            row[f"ρ = {r}"] = f"{_ci_text(e)}; lift {lift}; Q3 {q3}"
        row["n"] = ", ".join(str(per[r]["n"]) for r in ratios)
        rows.append(row)
    return write_markdown_table(rows, ["selector", *[f"ρ = {r}" for r in ratios], "n"])


def _regression_markdown(reg: dict, r2: dict) -> list[str]:
    from .report import write_markdown_table

    lines = []
    for model, coefs in reg.items():
        lines.append(f"### {model}: [{', '.join(coefs)}] (R² = {r2[model]:.3f})\n")
        rows = [
            {"term": c, "coef": e["coef"], "low": e["low"], "high": e["high"]}
            for c, e in coefs.items()
        ]
        lines.append(write_markdown_table(rows, ["term", "coef", "low", "high"]))
    return lines


def _markdown(
    summary: dict[str, Any],
    topn: dict,
    reg: dict,
    r2: dict,
    corr: dict,
    others: dict[str, tuple[dict, dict, dict]] | None = None,
) -> str:
    from .report import write_markdown_table

    s = summary
    gain_text = {
        "relative": "relative reduction (KL0 − KLτ)/(KL0 + 1e-12)",
        "absolute": "absolute reduction KL0 − KLτ (Eq. 1)",
    }
    lines = [
        "# Fixed-context diagnostic\n",
        f"- bank: {s['n_contexts']} held-out {s['task']} prompts × ≤{s['max_new_tokens']} "
        f"sampled tokens = {s['n_positions']} valid positions ({s['n_analysed']} analysed)",
        f"- update: {s['mode']}"
        + (
            f" ({s['update_steps']} steps of {s['update_batch_size']} prompts, "
            f"{s['update_strategy']}, lr {s['update_lr']:g})"
            if s["mode"] == "opd"
            else f" (one SGD step, η = {s['single_lr']:g}, per updated position)"
        ),
        f"- gain: {gain_text[s['gain_kind']]} of KL(p_T‖p_θ) over the full vocabulary, "
        f"winsorized at {s['winsorize']:g}/{1 - s['winsorize']:g}; mean KL0 {s['kl0_mean']:.4g}, "
        f"mean gain {s['gain_mean']:.4g} ({100 * s['gain_positive_share']:.0f}% of positions > 0)",
        f"- analysis D: {s['divergence']}; signals Eq. 11-normalized (5/95) over the bank",
        f"- intervals: 95% prompt-clustered bootstrap, {s['bootstrap']} draws",
        "",
        "## Matched top-N (every selector keeps n = round(ρ·N) positions)\n",
        "Mean gain of the kept positions [95% interval]; lift = kept mean / bank mean (gain per "
        "kept share); Q3 = share of kept positions in TIP's low-entropy/high-D quadrant.\n",
        _topn_markdown(topn),
        "## Standardized regressions of the gain (z-scored OLS)\n",
        *_regression_markdown(reg, r2),
    ]
    for kind, (t_o, reg_o, r2_o) in (others or {}).items():
        lines += [
            f"## The same with the {gain_text[kind]}\n",
            _topn_markdown(t_o),
            *_regression_markdown(reg_o, r2_o),
        ]
    lines.append("## Spearman correlation with the gain (taopd's extra; not in the paper)\n")
    rows = [{"signal": n, **e} for n, e in corr.items()]
    lines.append(
        write_markdown_table(rows, ["signal", "spearman", "spearman_low", "spearman_high"])
    )
    return "\n".join(lines)


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6, 4)) -> tuple:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _plots(
    out: Path, table: dict[str, np.ndarray], gain: np.ndarray, reg: dict, topn: dict
) -> list[Path]:
    """Gain by signal decile, D^L vs D^I coefficients, top-N gain by D^L vs by D^I."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    made = []
    names = [n for n in DECILE_SIGNALS if n in table]
    ncols = 4
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _figure(nrows, ncols, (4 * ncols, 3 * nrows))
    for ax, name in zip(axes.flat, names, strict=False):
        groups = np.array_split(np.argsort(table[name], kind="mergesort"), 10)
        groups = [g for g in groups if len(g)]
        means = [float(gain[g].mean()) for g in groups]
        errs = [
            1.96 * float(gain[g].std(ddof=1)) / math.sqrt(len(g)) if len(g) > 1 else 0.0
            for g in groups
        ]
        ax.errorbar(range(1, len(groups) + 1), means, yerr=errs, marker="o", capsize=2)
        ax.axhline(float(gain.mean()), color="grey", lw=0.8, ls="--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("decile", fontsize=8)
        ax.set_ylabel("mean gain", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle("Gain by signal decile (95% normal intervals; dashed: bank mean)")
    fig.tight_layout()
    made.append(plots / "gain_by_decile.png")
    fig.savefig(made[-1])

    if "split" in reg:
        coefs = reg["split"]
        labels = list(coefs)
        vals = [coefs[c]["coef"] or 0.0 for c in labels]
        # percentile intervals need not contain the point estimate: clip the bars at 0
        lo = [
            max(0.0, vals[i] - (coefs[c]["low"] if coefs[c]["low"] is not None else vals[i]))
            for i, c in enumerate(labels)
        ]
        hi = [
            max(0.0, (coefs[c]["high"] if coefs[c]["high"] is not None else vals[i]) - vals[i])
            for i, c in enumerate(labels)
        ]
        colours = [
            "tab:green" if c == "D_L" else "tab:red" if c == "D_I" else "tab:grey" for c in labels
        ]
        fig, axes = _figure(size=(7, 4))
        ax = axes[0, 0]
        ax.bar(labels, vals, yerr=[lo, hi], color=colours, capsize=3)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("standardized coefficient")
        ax.set_title("Gain regression, 'split' model: learnable D^L vs incompatible D^I")
        fig.tight_layout()
        made.append(plots / "coef_split.png")
        fig.savefig(made[-1])

    grid = sorted(
        {0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0}
        | {float(r) for r in next(iter(topn.values()), {})}
    )
    curves = _topn_means(table, gain, ["teachability", "incompatible"], grid, None, 0)
    fig, axes = _figure(size=(6.5, 4))
    ax = axes[0, 0]
    for sel, label, colour, shift in (
        ("teachability", "top by D^L = D̃·C̃", "tab:green", 0.97),
        ("incompatible", "top by D^I = D̃(1−C̃)", "tab:red", 1.03),
    ):
        ys = [curves[sel][r][0] for r in grid]
        ax.plot(grid, ys, marker="o", color=colour, label=label)
        if sel in topn:
            for r, e in topn[sel].items():
                if e["low"] is not None and e["mean"] is not None:
                    err = [[max(0.0, e["mean"] - e["low"])], [max(0.0, e["high"] - e["mean"])]]
                    ax.errorbar(
                        [float(r) * shift],
                        [e["mean"]],
                        yerr=err,
                        color=colour,
                        capsize=3,
                        fmt="s",
                        ms=4,
                    )  # bootstrap 95% interval
    ax.axhline(float(gain.mean()), color="grey", lw=0.8, ls="--", label="all positions")
    ax.set_xscale("log")
    ax.set_xlabel("retention ratio ρ (share of bank positions kept)")
    ax.set_ylabel("mean gain of the kept positions")
    ax.set_title("Learnable vs incompatible disagreement")
    ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(plots / "learnable_vs_incompatible.png")
    fig.savefig(made[-1])
    return made


def _write_positions(path: Path, columns: dict[str, Any]) -> None:
    """One CSV row per position; floats with 9 significant digits, NaN as an empty cell."""

    def cell(v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        return format(float(v), ".9g") if math.isfinite(float(v)) else ""

    names = list(columns)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(names)
        for i in range(len(columns[names[0]])):
            w.writerow([cell(columns[n][i]) for n in names])


# ---------------------------------------------------------------------------------------------
# The command


def _update_config(cfg: Config, out: Path) -> Config:
    """The trainer's config: the diagnose config with its update strategy, no evaluation."""
    data = cfg.model_dump(mode="json")
    data["output_dir"] = str(out / "update")
    if cfg.diagnose.update_strategy is not None:
        data["selection"]["strategy"] = cfg.diagnose.update_strategy
    data["train"].update(
        eval_before=False,
        eval_teacher=False,
        eval_every=0,
        save_every=0,
        samples_every=0,
        tensorboard=False,
    )
    data["eval"]["heldout_kl_prompts"] = 0
    d = cfg.diagnose
    for value, section, key in (
        (d.update_lr, "optim", "lr"),
        (d.update_steps, "train", "steps"),
        (d.update_batch_size, "train", "batch_size"),
    ):
        if value is not None:
            data[section][key] = value
    return Config.model_validate(data)


@torch.no_grad()
def _bank_samples(
    trainer: Any, bank: Rollout, sig0: TokenSignals, cfg: Config, dcfg: Any
) -> list[dict[str, Any]]:
    """Token-view records of the first bank contexts at θ0; marked: teachability's top 5%."""
    from .train import token_samples

    p = bank.prompt_len
    valid = bank.response_mask[:, p:]
    teach = strategy_scores("teachability", sig0, valid)
    keep = select(teach, valid, 0.05)
    n = min(N_TOKEN_VIEW, len(bank))
    sub = _rows(bank, slice(0, n)).to(trainer.acc.device)
    h_s = response_hidden(trainer.student, sub)
    h_t = response_hidden(trainer.teacher, sub)
    part = TokenSignals(**{name: t[:n] for name, t in sig0.items()})
    return token_samples(
        trainer.tokenizer,
        sub,
        part,
        keep[:n],
        h_s,
        h_t,
        lm_head(trainer.student),
        lm_head(trainer.teacher),
        trainer.vocab_size,
        step=0,
        rows=n,
        teach=teach[:n].clamp_min(0.0),
    )


def run_diagnose(
    cfg: Config,
    mode: str | None = None,
    bank_path: str | Path | None = None,
    relative: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the fixed-context diagnostic of `cfg` into `cfg.output_dir`; returns the summary.

    `mode` ('opd' / 'single-step') and `relative` override `cfg.diagnose`; `bank_path` reuses
    a saved bank instead of sampling one.
    """
    from .report import render_report
    from .run_dir import check_diagnose_output, write_marker
    from .train import Trainer

    if cfg.teacher_server is not None:
        raise UserError(
            "diagnose measures full-vocabulary KL gains and needs the teacher's weights; "
            "teacher_server is not supported there: drop it and point `teacher` at the model"
        )
    start = time.perf_counter()
    dcfg = cfg.diagnose.model_copy(
        update={k: v for k, v in (("mode", mode), ("relative", relative)) if v is not None}
    )
    if dcfg.mode not in ("opd", "single-step"):
        raise UserError(f"mode must be 'opd' or 'single-step', got {dcfg.mode!r}")
    out = Path(cfg.output_dir)
    check_diagnose_output(out, overwrite)  # and the bank: before any model or file is touched
    loaded = load_bank(bank_path) if bank_path is not None else None
    if loaded is not None and int(loaded[0].input_ids.max()) >= len(load_tokenizer(cfg.student)):
        raise UserError(f"bank {bank_path} holds token ids beyond this tokenizer's vocabulary")

    trainer = Trainer(_update_config(cfg, out), overwrite=True, progress=progress)
    write_marker(out, "diagnose")
    full_cfg = cfg.model_copy(update={"diagnose": dcfg})
    (out / "config.yaml").write_text(full_cfg.to_yaml())
    max_new = dcfg.max_new_tokens or cfg.rollout.max_new_tokens
    if loaded is not None:
        bank, prompts, meta = loaded
        if int(bank.input_ids.max()) >= trainer.vocab_size:
            raise UserError(f"bank {bank_path} holds token ids beyond this tokenizer's vocabulary")
    else:
        bank, prompts, meta = make_bank(
            trainer, dcfg.n_contexts, max_new, dcfg.batch_size, dcfg.seed, progress
        )
    save_bank(out / BANK_FILE, bank, prompts, meta)

    p = bank.prompt_len
    valid = bank.response_mask[:, p:]
    if not bool(valid.any()):
        raise UserError("the bank has no response tokens (every rollout ended at once)")
    teacher_cache: list[Tensor] = []
    score_kw = dict(
        k=cfg.selection.k,
        batch_size=dcfg.batch_size,
        chunk_size=cfg.selection.chunk_size,
        teacher_cache=teacher_cache,
        progress=progress,
    )
    sig0 = score_bank(
        trainer.student,
        trainer.teacher,
        bank,
        trainer.vocab_size,
        desc="bank: scoring θ0",
        **score_kw,
    )
    kl0 = sig0.forward_kl.double().numpy()
    samples = _bank_samples(trainer, bank, sig0, cfg, dcfg)

    info: dict[str, Any] = {}
    if dcfg.mode == "opd":
        info = _opd_update(trainer, progress)
        sig_tau = score_bank(
            trainer.student,
            trainer.teacher,
            bank,
            trainer.vocab_size,
            desc="bank: scoring θτ",
            **score_kw,
        )
        kl_tau = sig_tau.forward_kl.double().numpy()
        g_abs = kl0 - kl_tau
        g_rel = relative_gain(kl0, kl_tau)
        gains = {
            "kl_tau": kl_tau,
            "gain": g_rel if dcfg.relative else g_abs,
            "gain_absolute": g_abs,
            "gain_relative": g_rel,
        }
        if dcfg.save_student:
            model = trainer.acc.unwrap_model(trainer.student)
            model.save_pretrained(out / "update" / "student", safe_serialization=True)
            trainer.tokenizer.save_pretrained(out / "update" / "student")
    else:
        gains = _single_step(trainer, bank, sig0, teacher_cache, dcfg, progress)
        info = {"single_lr": dcfg.single_lr, "n_single": dcfg.n_single}

    # one row per valid position
    vflat = valid.reshape(-1).numpy()
    width = valid.shape[1]
    rows_idx = np.flatnonzero(vflat)
    prompt_id, pos = rows_idx // width, rows_idx % width
    token_ids = bank.input_ids[:, p:].reshape(-1).numpy()[rows_idx]
    tok = trainer.tokenizer
    tokens = [tok.decode([int(t)]) for t in token_ids]
    columns: dict[str, Any] = {
        "prompt_id": prompt_id,
        "position": pos,
        "token_id": token_ids,
        "token": tokens,
    }
    raw = {name: t.double().reshape(-1).numpy()[rows_idx] for name, t in sig0.items()}
    columns.update(raw)
    columns["kl0"] = kl0.reshape(-1)[rows_idx]
    for name, g in gains.items():
        columns[name] = np.asarray(g, dtype=float).reshape(-1)[rows_idx]
    full_norm = analysis_table({**raw, "position": pos.astype(float)}, dcfg.divergence)
    for name in ("H", "D", "C", "Ht", "pos", "teachability", "incompatible", "tip", "q3"):
        columns[f"{name}_norm" if name in ("H", "D", "C", "Ht", "pos") else name] = full_norm[name]
    _write_positions(out / "positions.csv", columns)
    gain_grid = np.asarray(gains["gain"], dtype=float).reshape(valid.shape)
    with open(out / "samples.jsonl", "w") as f:
        for b, rec in enumerate(samples):
            g = gain_grid[b][valid[b].numpy()]
            rec["signals"]["gain"] = [None if not np.isfinite(x) else float(x) for x in g]
            f.write(json.dumps(rec) + "\n")

    # statistics over the positions with a gain, each gain winsorized (released: 1/99)
    keep = np.isfinite(columns["gain"])
    table = analysis_table(
        {
            **{n: v[keep] for n, v in raw.items()},
            "position": pos[keep].astype(float),
            "kl0": columns["kl0"][keep],
        },
        dcfg.divergence,
    )
    primary = "relative" if dcfg.relative else "absolute"
    other = "absolute" if dcfg.relative else "relative"
    stat_gains = {
        kind: winsorize(columns[f"gain_{kind}"][keep], dcfg.winsorize) for kind in (primary, other)
    }
    gain = stat_gains[primary]
    clusters = prompt_id[keep]
    if keep.sum() < 3:
        raise UserError(f"only {int(keep.sum())} positions have a gain; nothing to analyse")
    bar = tqdm(total=3, desc="statistics (bootstrap)", disable=not progress)
    topn_all = matched_topn(
        table, stat_gains, clusters, dcfg.selectors, dcfg.ratios, dcfg.bootstrap, dcfg.seed
    )
    topn, topn_other = topn_all[primary], topn_all[other]
    bar.update(1)
    models = {**REGRESSION_MODELS, **(INTERACTION_MODEL if dcfg.split_interaction else {})}
    reg, r2 = regressions(table, gain, clusters, models, n_boot=dcfg.bootstrap, seed=dcfg.seed)
    reg_other, r2_other = regressions(
        table, stat_gains[other], clusters, models, n_boot=dcfg.bootstrap, seed=dcfg.seed
    )
    bar.update(1)
    corr = correlations(table, gain, clusters, n_boot=dcfg.bootstrap, seed=dcfg.seed)
    bar.update(1)
    bar.close()

    summary: dict[str, Any] = {
        "mode": dcfg.mode,
        "relative": dcfg.relative,
        "student": cfg.student,
        "teacher": str(trainer.teacher_path),
        "task": cfg.task.name or cfg.task.path,
        "n_contexts": len(bank),
        "max_new_tokens": int(meta.get("max_new_tokens", max_new)),
        "n_positions": int(vflat.sum()),
        "n_analysed": int(keep.sum()),
        "kl0_mean": float(kl0.reshape(-1)[vflat].mean()),
        "gain_mean": float(gain.mean()),
        "gain_positive_share": float((gain > 0).mean()),
        "gain_kind": primary,
        "winsorize": dcfg.winsorize,
        "divergence": dcfg.divergence,
        "gain_absolute_mean": float(np.nanmean(columns["gain_absolute"][keep])),
        "gain_relative_mean_winsorized": float(stat_gains["relative"].mean()),
        "bootstrap": dcfg.bootstrap,
        **info,
        "r2": r2,
        f"r2_{other}": r2_other,
        "regression_terms": {m: cols for m, cols in models.items()},
        "term_meanings": REGRESSION_TERMS,
    }
    if dcfg.mode == "opd":
        summary["kl_tau_mean"] = float(columns["kl_tau"].mean())
    summary["wall_seconds"] = time.perf_counter() - start
    (out / "matched_topn.json").write_text(json.dumps(topn, indent=2))
    (out / f"matched_topn_{other}.json").write_text(json.dumps(topn_other, indent=2))
    (out / "regression.json").write_text(json.dumps(reg, indent=2))
    (out / f"regression_{other}.json").write_text(json.dumps(reg_other, indent=2))
    (out / "correlations.json").write_text(json.dumps(corr, indent=2))
    _plots(out, table, gain, reg, topn)
    (out / "diagnose.md").write_text(
        _markdown(summary, topn, reg, r2, corr, {other: (topn_other, reg_other, r2_other)})
    )
    summary["wall_seconds"] = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    render_report(out)
    summary["output_dir"] = str(out)
    return summary

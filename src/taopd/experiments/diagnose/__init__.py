"""The fixed-context diagnostic (arXiv 2605.26844, Eq. 1): which tokens' losses actually help?

1. Bank (bank.py): the student's own rollouts (temperature 1) on held-out prompts, frozen in
   `bank.pt`, so θ0 and θτ are scored on the same prefixes.
2. θ0 on the bank: every per-position signal (`teachers.score_rollout`, chunked, never
   [B, T, V]) and KL0 = KL(p_T‖p_θ0) over the full vocabulary (`TokenSignals.forward_kl`).
3. Update (gains.py): `opd` runs a short OPD on the training split with `Trainer.train_step`
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

Modules: bank.py (the bank and its scoring), gains.py (the updates and their gains),
statistics.py (the analysis), outputs.py (positions.csv, diagnose.md, plots), run.py
(`run_diagnose`: the steps above in order).
"""

from __future__ import annotations

from .bank import BANK_FILE, load_bank, make_bank, save_bank, score_bank
from .gains import REL_EPS, relative_gain, single_step_gain
from .run import _update_config, run_diagnose
from .statistics import (
    CORRELATION_SIGNALS,
    DECILE_SIGNALS,
    DIVERGENCES,
    INTERACTION_MODEL,
    REGRESSION_MODELS,
    REGRESSION_TERMS,
    SIGNAL_FIELDS,
    analysis_table,
    bootstrap_draws,
    correlations,
    matched_count,
    matched_topn,
    ols_standardized,
    rankdata,
    regressions,
    spearman,
    winsorize,
)

__all__ = [
    "BANK_FILE",
    "CORRELATION_SIGNALS",
    "DECILE_SIGNALS",
    "DIVERGENCES",
    "INTERACTION_MODEL",
    "REGRESSION_MODELS",
    "REGRESSION_TERMS",
    "REL_EPS",
    "SIGNAL_FIELDS",
    "_update_config",
    "analysis_table",
    "bootstrap_draws",
    "correlations",
    "load_bank",
    "make_bank",
    "matched_count",
    "matched_topn",
    "ols_standardized",
    "rankdata",
    "regressions",
    "relative_gain",
    "run_diagnose",
    "save_bank",
    "score_bank",
    "single_step_gain",
    "spearman",
    "winsorize",
]

"""One table of the per-position signals' names (scores.TokenSignals), used by the step's
metrics, the token samples, the report and the diagnostic.

`field` is the TokenSignals attribute (and the key in samples.jsonl and the diagnostic's
tables); `metric` is the stem of its `*_all` / `*_selected` keys in metrics.jsonl; `label`
says what it is, with the paper's equation.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["METRIC_SIGNALS", "PLOTTED_SIGNALS", "SAMPLE_SIGNALS", "SIGNALS", "Signal", "label"]


class Signal(NamedTuple):
    field: str
    metric: str
    label: str


SIGNALS = (
    Signal("teachability", "teachability", "teachability s = D̃·C̃ (Eq. 12)"),
    Signal("reverse_kl", "kl", "reverse KL(p_S‖p_T) (Eq. 6)"),
    Signal("forward_kl", "forward_kl", "forward KL(p_T‖p_S)"),
    Signal("student_entropy", "entropy", "student entropy H (full vocabulary)"),
    Signal("teacher_entropy", "teacher_entropy", "teacher entropy"),
    Signal("disagreement", "disagreement", "disagreement D on S^S ∪ S^T (Eq. 9)"),
    Signal("compatibility", "compatibility", "compatibility C = Σ_{v∈S^S} p_T(v) (Eq. 10)"),
    Signal("compatibility_lb", "compatibility_lb", "compatibility lower bound Ĉ (Eq. 17)"),
    Signal("overlap", "overlap", "top-K overlap |S^S ∩ S^T| / K"),
    Signal("log_ratio", "kl_sampled", "log p_S(y) − log p_T(y), sampled-token KL estimate"),
)

# logged as <metric>_all / <metric>_selected each step (overlap: _all only; kl_sampled: served)
METRIC_SIGNALS = SIGNALS[:7]
# metrics drawn in the report's "Token signals" figure, selected vs all
PLOTTED_SIGNALS = ("teachability", "entropy", "teacher_entropy", "disagreement", "compatibility")
# written per token to samples.jsonl (besides teachability, normalized over the batch)
SAMPLE_SIGNALS = ("student_entropy", "disagreement", "compatibility", "reverse_kl")


def label(field: str) -> str:
    """The label of a signal field (the field itself if it is not in the table)."""
    return next((s.label for s in SIGNALS if s.field == field), field)

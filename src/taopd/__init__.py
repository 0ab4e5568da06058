"""taopd: selective on-policy distillation by token teachability (arXiv 2605.26844).

The core (`taopd.core`: `scores`, `selection`, `loss`) imports torch only and is public here, so
any trainer can compute signals, pick a token mask and apply the loss on the kept positions.
The packages show the layers (docs/layout.md): core < config, data, models < training, reports
< experiments < cli.
"""

from .core.loss import LOSS_KINDS, opd_loss, per_token_loss, row_weights, selective_head_loss
from .core.scores import (
    HeadSpec,
    TokenSignals,
    normalize,
    quantile,
    signals_from_hidden,
    teachability,
    teachability_of,
    token_signals,
    topk_signals,
    trim_vocab,
)
from .core.selection import STRATEGIES, count_for, select, select_tokens, strategy_scores
from .core.weights import iw_opd_weights, score_weights, token_weights

__version__ = "0.1.0"


__all__ = [
    "HeadSpec",
    "LOSS_KINDS",
    "iw_opd_weights",
    "score_weights",
    "token_weights",
    "STRATEGIES",
    "TokenSignals",
    "count_for",
    "normalize",
    "opd_loss",
    "per_token_loss",
    "quantile",
    "row_weights",
    "select",
    "select_tokens",
    "selective_head_loss",
    "signals_from_hidden",
    "strategy_scores",
    "teachability",
    "teachability_of",
    "token_signals",
    "topk_signals",
    "trim_vocab",
]

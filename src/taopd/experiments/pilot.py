"""The pilot gate: does a setting leave room for selection? (`taopd pilot CONFIG`)

Runs the first training steps of a config into a scratch folder, without evaluation or
checkpoints, and reports per step how the reverse KL of the rollout batch is spread: the share of
response positions the student already solves (KL < 0.05 nats) and the share of the total KL held
by the top 5% of positions. The paper's regime has many solved positions and a heavy tail; the
demo's 2-6-token answers have neither, so a 5% budget throws most of the signal away there.
"""

from __future__ import annotations

import tempfile
from typing import Any

from ..config import Config, training_only

__all__ = ["PILOT_KEYS", "pilot"]

PILOT_KEYS = (
    "solved_share",
    "kl_top5_share",
    "kl_top5_incompatible",
    "top5_overlap",
    "compat_q05",
    "compat_q50",
    "compat_q95",
    "style_share_all",
    "style_share_kl_top5",
    "kl_all",
    "n_valid",
    "n_selected",
    "selected_fraction",
)


def pilot(cfg: Config, steps: int = 1, progress: bool = True) -> list[dict[str, Any]]:
    """The first `steps` steps' spread of the reverse KL (and selection counts), one dict each."""
    from ..training.train import Trainer

    with tempfile.TemporaryDirectory(prefix="taopd-pilot-") as tmp:
        data = training_only(cfg, tmp)
        data["train"]["steps"] = steps
        trainer = Trainer(Config.model_validate(data), overwrite=True, progress=progress)
        out: list[dict[str, Any]] = []
        try:
            while trainer.step < steps:
                m = trainer.train_step()
                if m is not None:
                    out.append({"step": trainer.step, **{k: m.get(k) for k in PILOT_KEYS}})
        finally:
            trainer.close()
    return out

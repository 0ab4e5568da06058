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

__all__ = ["PILOT_KEYS", "pct", "pilot", "pilot_report", "pilot_verdict"]

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


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) is not None and r[key] == r[key]]
    return sum(vals) / len(vals) if vals else None


def pilot_verdict(rows: list[dict[str, Any]]) -> str:
    """In words: can teachability and reverse-KL selection differ on this pair? From the share
    of the top 5% by reverse KL whose compatibility C < 0.5 (the largest disagreements sit off
    the student's top-K) and the overlap of the two top-5% sets, averaged over the steps."""
    off, overlap = _mean(rows, "kl_top5_incompatible"), _mean(rows, "top5_overlap")
    if off is None or overlap is None:
        return (
            "Teachability vs reverse KL: not measurable here (the teacher's full distribution is "
            "needed for C and the overlap)."
        )
    facts = (
        f"{off:.0%} of the top 5% by reverse KL have C < 0.5; teachability's and reverse KL's "
        f"top-5% sets share {overlap:.0%} of their positions"
    )
    if off < 0.1 and overlap >= 0.7:
        return (
            f"Teachability vs reverse KL: they pick nearly the same positions here ({facts}), so "
            "expect them to train alike: choose by cost (reverse KL needs no top-K supports)."
        )
    if off >= 0.5:
        return (
            f"Teachability vs reverse KL: they can differ here ({facts}): most of the largest "
            "disagreements sit off the student's support, where teachability does not look. "
            "Compare them before choosing: taopd compare CONFIG --strategies "
            "teachability,reverse_kl,full --seeds 3 (see the manual's 'Which rule should I use?')."
        )
    return (
        f"Teachability vs reverse KL: they differ in part ({facts}); a short "
        "`taopd compare CONFIG --strategies teachability,reverse_kl,full` decides."
    )


def pct(x: float | None) -> str:
    """A share as '12.3%' ('n/a' for None)."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def pilot_report(rows: list[dict[str, Any]]) -> str:
    """The pilot's tables (KL spread, off-support share and overlap, planted style when there is
    one) and its verdict in words, as `taopd pilot` prints them."""
    lines = ["step  positions  solved (KL<0.05)  KL held by top 5%  mean reverse KL  kept"]
    lines += [
        f"{r['step']:>4}  {r['n_valid']:>9}  {pct(r['solved_share']):>16}  "
        f"{pct(r['kl_top5_share']):>17}  {r['kl_all']:>15.3f}  {r['n_selected']:>4}"
        for r in rows
    ]
    lines += ["", "step  top 5% by KL with C<0.5  top-5% overlap (teachability, KL)  C at 5/50/95%"]
    for r in rows:
        q = "/".join(f"{r[k]:.4f}" for k in ("compat_q05", "compat_q50", "compat_q95"))
        lines.append(
            f"{r['step']:>4}  {pct(r['kl_top5_incompatible']):>22}  "
            f"{pct(r['top5_overlap']):>34}  {q}"
        )
    if rows and rows[0].get("style_share_all") is not None:
        lines += ["", "step  planted-style positions: of all  of the top 5% by KL"]
        lines += [
            f"{r['step']:>4}  {pct(r['style_share_all']):>30}  {pct(r['style_share_kl_top5']):>19}"
            for r in rows
        ]
    return "\n".join([*lines, "", pilot_verdict(rows)])

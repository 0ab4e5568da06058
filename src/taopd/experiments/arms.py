"""A comparison's arms: one training run per selection setting and seed (`Arm`), their labels
(`teachability+1`, `teachability:valid`), and the sweep a `taopd compare` plans (`plan_arms`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from ..errors import UserError

__all__ = ["Arm", "parse_arm_label", "plan_arms", "with_lrs"]


@dataclass(frozen=True)
class Arm:
    """One run of the comparison. `min_per_sequence` > 0 is the released budget rule (at least
    that many kept positions per rollout), labelled `strategy+N` (e.g. `teachability+1`);
    `normalize="valid"` the fixed per-token weight (`loss.normalize`), labelled `strategy:valid`;
    `lr` (None: the config's optim.lr) the arm's learning rate, chosen by `--lr-grid`;
    `mode="weight"` trains every position weighted by the strategy (`selection.mode`), labelled
    `strategy@weight` (`iw_opd` is always so)."""

    strategy: str
    ratio: float
    k: int
    batch_size: int
    seed: int
    min_per_sequence: int = 0
    normalize: str = "kept"
    lr: float | None = None
    mode: str = "select"

    @property
    def label(self) -> str:
        return (
            self.strategy
            + (f"+{self.min_per_sequence}" if self.min_per_sequence else "")
            + (":valid" if self.normalize == "valid" else "")
            + ("@weight" if self.mode == "weight" else "")
        )

    @property
    def name(self) -> str:
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.label}-r{self.ratio:g}-k{self.k}-b{self.batch_size}{lr}-s{self.seed}"

    @property
    def group(self) -> tuple[str, float, int, int]:
        return (self.label, self.ratio, self.k, self.batch_size)

    def overrides(self) -> list[str]:
        return [
            f"selection.strategy={self.strategy}",
            f"selection.ratio={self.ratio}",
            f"selection.k={self.k}",
            f"selection.min_per_sequence={self.min_per_sequence}",
            f"loss.normalize={self.normalize}",
            f"selection.mode={self.mode}",
            f"train.batch_size={self.batch_size}",
            f"train.seed={self.seed}",
        ] + ([] if self.lr is None else [f"optim.lr={self.lr}"])

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Arm:
        label, mode = _parse_mode(str(row["strategy"]))
        label, _, norm = label.partition(":")
        strategy, minimum = parse_arm_label(label)
        lr = row.get("lr")
        return cls(
            strategy, row["ratio"], row["k"], row["batch_size"], row["seed"], minimum,
            norm or "kept", None if lr in (None, "") else float(lr), mode,
        )  # fmt: skip

    @classmethod
    def from_name(cls, name: str) -> Arm:
        """The arm whose `name` (its folder under arms/) this is; the inverse of `Arm.name`."""
        if m := _NAME.match(name):
            g = {**m.groupdict(), "ratio": float(m["ratio"]), "seed": int(m["seed"])}
            arm = cls.from_row({**g, "k": int(m["k"]), "batch_size": int(m["batch_size"])})
            if arm.name == name:
                return arm
        raise UserError(f"{name!r} is not an arm folder name of taopd compare")


_NAME = re.compile(
    r"^(?P<strategy>.+)-r(?P<ratio>[^-]+)-k(?P<k>\d+)-b(?P<batch_size>\d+)"
    r"(?:-lr(?P<lr>.+?))?-s(?P<seed>\d+)$"
)


def parse_arm_label(label: str) -> tuple[str, int]:
    """'teachability+1' → ('teachability', 1): a strategy and the released at-least-N-per-
    rollout rule (`selection.min_per_sequence`); a bare name → (name, 0)."""
    from ..core.selection import STRATEGIES
    from ..core.weights import WEIGHT_ONLY

    name, plus, count = label.strip().partition("+")
    if name not in STRATEGIES and name not in WEIGHT_ONLY:
        raise UserError(
            f"unknown strategy {name!r}; choose from "
            f"{', '.join(sorted((*STRATEGIES, *WEIGHT_ONLY)))} "
            "(a '+N' suffix, e.g. teachability+1, keeps at least N positions per rollout; "
            "a ':valid' suffix normalizes the loss by all valid positions; an '@weight' suffix "
            "trains every position weighted by the strategy's score)"
        )
    if not plus:
        return name, 0
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"strategy {label!r}: the suffix must be '+N' with N >= 1 (e.g. +1)")
    if name == "full":
        raise UserError(f"strategy {label!r}: full already keeps every position")
    return name, int(count)


def _parse_mode(label: str) -> tuple[str, str]:
    """'teachability@weight' → ('teachability', 'weight'); 'iw_opd' → ('iw_opd', 'weight')
    (a weight-only rule); a label without '@' → (label, 'select')."""
    from ..core.weights import WEIGHT_ONLY

    base, at, mode = label.strip().partition("@")
    if at and mode not in ("select", "weight"):
        raise UserError(f"strategy {label!r}: the suffix after '@' must be 'weight' or 'select'")
    mode = mode or ("weight" if base.partition("+")[0] in WEIGHT_ONLY else "select")
    if mode == "weight" and ("+" in base or ":" in base):
        raise UserError(f"strategy {label!r}: '@weight' trains every position; no '+N' or ':'")
    return base, mode


def _parse_normalize(label: str) -> tuple[str, str]:
    """'teachability:valid' → ('teachability', 'valid'); a label without ':' → (label, 'kept')."""
    base, colon, norm = label.strip().partition(":")
    if colon and norm not in ("kept", "valid"):
        raise UserError(f"strategy {label!r}: the suffix after ':' must be 'kept' or 'valid'")
    return base, norm or "kept"


def plan_arms(
    strategies: list[str], ratios: list[float], seeds: int, ks: list[int], batch_sizes: list[int]
) -> list[Arm]:
    """All arms; `full` keeps every position, so it runs once at ratio 1 (and one K).
    A strategy `name+N` keeps at least N positions per rollout (the released rule)."""
    parsed = []
    for label in strategies:
        base, mode = _parse_mode(label)
        base, norm = _parse_normalize(base)
        parsed.append((*parse_arm_label(base), norm, mode))
    for r in ratios:
        if not 0 < r <= 1:
            raise UserError(f"--ratios: each ratio must be in (0, 1], got {r}")
    arms: list[Arm] = []
    for bs in batch_sizes:
        for seed in range(seeds):
            for s, minimum, norm, mode in parsed:
                uses_k = s not in ("full", "random", "entropy", "reverse_kl", "early", "iw_opd")
                every = s == "full" or mode == "weight"  # trains every position: ratio 1
                for k in ks if uses_k else ks[:1]:
                    for r in [1.0] if every else ratios:
                        arms.append(Arm(s, r, k, bs, seed, minimum, norm, mode=mode))
    return arms


def with_lrs(arms: list[Arm], choice: dict[tuple[str, float, int, int], float]) -> list[Arm]:
    """The arms, each with its group's chosen learning rate."""
    return [replace(a, lr=choice[a.group]) for a in arms]

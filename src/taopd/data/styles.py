"""Worked solutions and planted styles: a fine-tune target's marked steps, and the position
kinds (`StyleTagger`) the metrics split the KL by.
"""

from __future__ import annotations

import re
from typing import Any

_TERM = re.compile(r"\s*([+-])\s*(\d+)")


def worked_chain_sum(expression: str) -> str:
    """A chain-of-thought solution of a reasoning-gym `chain_sum` expression ('12 + 34 - 5'):
    one running partial sum per line, then '#### answer' (what `extract_answer` reads)."""
    text = expression.strip()
    head = re.match(r"-?\d+", text)
    if head is None:
        raise ValueError(f"not a chain_sum expression: {expression!r}")
    total = int(head.group())
    rest = text[head.end() :]
    terms = _TERM.findall(rest)
    if "".join(f"{op}{n}" for op, n in terms) != re.sub(r"\s", "", rest):
        raise ValueError(f"not a chain_sum expression: {expression!r}")
    lines = []
    for op, n in terms:
        new = total + int(n) if op == "+" else total - int(n)
        lines.append(f"{total} {op} {n} = {new}")
        total = new
    return "\n".join([*lines, f"#### {total}"])


def styled_solution(solution: str, marker: str, where: str = "line", every: int = 1) -> str:
    """A worked solution rewritten in a teacher style (the `mismatch` recipe): `marker` at the
    start of step lines 0, every, 2·every, ... (`where="line"`) or after their '= '
    (`where="result"`). The final '#### answer' line is never marked, so the scorer reads the same
    answer in both styles."""
    out = []
    step = 0
    for line in solution.split("\n"):
        if line.startswith("####"):
            out.append(line)
            continue
        if step % every == 0:
            if where == "line":
                line = marker + line
            elif " = " in line:
                head, tail = line.rsplit(" = ", 1)
                line = f"{head} = {marker}{tail}"
        out.append(line)
        step += 1
    return "\n".join(out)


def style_positions(token_texts: list[str], marker: str, where: str = "line") -> list[bool]:
    """Which response positions are planted-style slots: where the styled teacher writes its
    marker (a step line's start, or right after '= ' for `where="result"`), or any token that
    carries the marker's characters. The slot before a '####' line is not one (never marked).
    A prefix walk over the decoded tokens: position t is judged on the text before it."""
    core = marker.strip() or marker
    tags: list[bool] = []
    text = ""
    for tok in token_texts:
        line = text.rsplit("\n", 1)[-1]
        if where == "line":
            slot = line.strip() == "" and not tok.lstrip().startswith("#") and tok.strip() != ""
        else:
            slot = line.rstrip().endswith("=") and "=" not in tok and tok.strip() != ""
        tags.append(slot or core in tok)
        text += tok
    return tags


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text as it reads in the decoded sequence (a prefix walk, so characters split
    over byte-level tokens land on the token that completes them)."""
    out, prev = [], ""
    for t in range(len(ids)):
        text = tokenizer.decode(ids[: t + 1])
        out.append(text[len(prev) :] if text.startswith(prev) else tokenizer.decode([ids[t]]))
        prev = text
    return out


class StyleTagger:
    """Tags the planted-style positions of response tokens (`teacher_sft.style`), so metrics,
    samples and the diagnostic can be split by position kind (style vs other)."""

    kinds = ("style", "other")

    def __init__(self, tokenizer: Any, marker: str, where: str = "line") -> None:
        self.tokenizer, self.marker, self.where = tokenizer, marker, where

    def row(self, ids: list[int]) -> list[bool]:
        """One response's tags (its valid tokens in order)."""
        return style_positions(token_texts(self.tokenizer, ids), self.marker, self.where)

    def __call__(self, ids: Any, valid: Any) -> Any:
        """Bool tags [B, T] of response ids [B, T] at the valid positions (False elsewhere)."""
        import torch

        out = torch.zeros_like(valid, dtype=torch.bool)
        for b in range(valid.shape[0]):
            idx = valid[b].nonzero().squeeze(-1)
            if idx.numel():
                tags = self.row(ids[b, idx].tolist())
                out[b, idx] = torch.tensor(tags, dtype=torch.bool, device=valid.device)
        return out


class NoTags:
    """The tagger of a setting without a planted style: no position kinds."""

    kinds: tuple[str, ...] = ()

    def __call__(self, ids: Any, valid: Any) -> None:
        return None


def make_tagger(style: Any, tokenizer: Any) -> StyleTagger | NoTags:
    """The position tagger of a run: planted-style tags when the teacher has a `style`."""
    return NoTags() if style is None else StyleTagger(tokenizer, style.marker, style.where)


WORKED_SOLUTIONS = {"chain_sum": lambda entry: worked_chain_sum(entry["metadata"]["expression"])}
"""reasoning-gym tasks with a worked-solution writer (`task.solution: worked`)."""

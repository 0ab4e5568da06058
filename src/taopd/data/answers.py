"""Answer checks: the answer a completion gives (`<answer>`, `\\boxed{}`, the last number),
and whether it matches the reference (numbers, then math-verify for expressions).
"""

from __future__ import annotations

import re
from typing import Any

_EOS_REMNANTS = re.compile(r"<\|[^|<>]{1,40}\|>|</s>|<s>|<eos>|<pad>|\[/?INST\]")
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} (braces balanced), as MATH-style solutions give it."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(completion: str) -> str:
    """The final answer: after the last '####', in <answer>, in the last \\boxed{}, last number.

    Special-token remnants (`<|im_end|>`, `</s>`, ...) are removed first; a number loses its
    thousands commas and `$` so '1,234' and '$1234' both give '1234'.
    """
    text = _EOS_REMNANTS.sub(" ", completion)
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else ""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    if numbers:
        return re.sub(r"[\s,$]", "", numbers[-1])
    return text.strip()


def parse_number(text: str) -> float | None:
    """`text` as a float after dropping commas, `$`, `%`, spaces and a final period; else None."""
    cleaned = re.sub(r"[,$%\s]", "", text.strip()).rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def numbers_equal(a: str, b: str) -> bool:
    """True if both strings are numbers of equal value (relative tolerance 1e-9)."""
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    return abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y))


def reference_answer(answer: Any) -> str:
    """A reference answer as a string; GSM8K's '... #### 42' becomes '42'."""
    text = str(answer).strip()
    boxed = _last_boxed(text)
    if boxed is not None:  # a MATH-style full solution
        return boxed
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
        num = parse_number(text)
        if num is not None:
            text = re.sub(r"[,$\s]", "", text).rstrip(".")
    return text


_MATHY = re.compile(r"[\d\\^{}=+\-*/()\[\]]")  # a digit, LaTeX or an operator: worth parsing


def _math_verify(got: str, ref: str) -> bool:
    r"""LaTeX-aware equivalence by math-verify (`\frac{1}{2}` = `0.5`, sets, intervals, ...).

    Both sides are parsed as \boxed{...} answers; its signal-based timeout works only in the
    main thread, so other threads parse without one.
    """
    import threading

    from math_verify import parse, verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"\\boxed{{{ref}}}", parsing_timeout=limit)
        pred = parse(f"\\boxed{{{got}}}", parsing_timeout=limit)
        return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=limit))
    except Exception:  # math-verify raises on unparsable or timed-out input: not a match
        return False


def answers_match(got: str, ref: str) -> bool:
    """True if an extracted answer equals the reference: numbers by value (GSM8K's `#### N`),
    then exact text, then math-verify's LaTeX-aware equivalence (MATH-style answers; plain words
    are never sent to it, since it reads them as products of symbols)."""
    got, ref = got.strip(), ref.strip()
    if parse_number(ref) is not None and parse_number(got) is not None:
        return numbers_equal(got, ref)
    if got == ref:
        return True
    if not (_MATHY.search(got) and _MATHY.search(ref)):  # words: exact ('paris' ≠ 'Paris')
        return False
    return _math_verify(got, ref)

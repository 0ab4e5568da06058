"""The product's voice, shared by the taopd modules: `UserError` (one line, no traceback), the
one-line notices printed to stderr, and the "did you mean ...?" of a misspelled name."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable

__all__ = ["UserError", "did_you_mean", "notice"]


class UserError(Exception):
    """An error caused by user input; the CLI prints its message without a traceback."""


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """' (did you mean <prefix>X?)' for the choice X closest to `word`, or '' when none is."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.7)
    return f" (did you mean {prefix}{match[0]}?)" if match else ""


def notice(message: str) -> None:
    """Print `taopd: <message>` to stderr, once per launch (the main process only)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"taopd: {message}", file=sys.stderr, flush=True)

"""The product's voice, shared by the taopd modules: `UserError` (one line, no traceback), the
one-line notices printed to stderr, the "did you mean ...?" of a misspelled name, and the
third-party notices kept off taopd's output."""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Iterable

__all__ = [
    "DEEPSPEED_CPU_NOTICE",
    "UserError",
    "did_you_mean",
    "notice",
    "quiet_deepspeed_notice",
]

DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


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


class _DropDeepSpeedCPUNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(DEEPSPEED_CPU_NOTICE)


_DEEPSPEED_FILTER = _DropDeepSpeedCPUNotice()


def quiet_deepspeed_notice(on: bool = True) -> None:
    """Drop (`on`) or let through DeepSpeed's "Setting accelerator to CPU. If you have GPU ..."
    warning, and only that line of DeepSpeed's log.

    DeepSpeed logs it when it is imported on a machine without a GPU, and accelerate imports it
    whenever it is installed (transformers' `save_pretrained`, `Accelerator.unwrap_model`), so
    every CPU run printed it although DeepSpeed was not used. The filter sits on DeepSpeed's
    logger before DeepSpeed creates it (`logging.getLogger` returns the same object), so it holds
    however late DeepSpeed is imported. The DeepSpeed engine turns it off (`on=False`).
    """
    logger = logging.getLogger("DeepSpeed")
    if on:
        logger.addFilter(_DEEPSPEED_FILTER)  # a no-op when already there
    else:
        logger.removeFilter(_DEEPSPEED_FILTER)

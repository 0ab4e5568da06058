"""Exceptions shared by the taopd modules."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error caused by user input; the CLI prints its message without a traceback."""

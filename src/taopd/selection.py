"""Deprecated path: `taopd.selection` moved to `taopd.core.selection`.

Its public names stay importable from `taopd`."""

from taopd._moved import alias

alias(__name__)

"""Deprecated path: `taopd.loss` moved to `taopd.core.loss`.

Its public names stay importable from `taopd`."""

from taopd._moved import alias

alias(__name__)

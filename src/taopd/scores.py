"""Deprecated path: `taopd.scores` moved to `taopd.core.scores`.

Its public names stay importable from `taopd`."""

from taopd._moved import alias

alias(__name__)

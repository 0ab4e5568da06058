"""The torch-only core: per-token signals (`scores`), token selection (`selection`), the
distillation losses (`loss`) and the signals' names (`signal_names`).

Imports torch and nothing else of taopd (checked by import-linter and tests/test_layers.py), so
any trainer can use it; `taopd` re-exports its public API.
"""

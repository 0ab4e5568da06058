"""What is built from training runs: strategy comparisons (`compare`), the pilot gate
(`pilot`) and the fixed-context diagnostic (`diagnose/`).

May import everything below it (`reports`, `training`, the foundation modules, `core`).
"""

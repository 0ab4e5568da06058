"""The training loop and what it runs on: rollouts and samplers, teachers and the teacher
server, student engines, checkpoints, the run folder, collectives, metrics, token samples,
evaluation and the cached SFT warm starts.

May import `taopd.core` and the foundation modules (`config`, `data`, `models`, `errors`,
`seeds`); never `experiments`, `reports` or `cli`.
"""

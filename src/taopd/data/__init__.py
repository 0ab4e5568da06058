"""Tasks (reasoning-gym generators, local JSONL/JSON/parquet files), prompts, answer checks.

A task yields `Example`s for a split and scores a completion against one (`tasks.py`); answers
are checked in `answers.py`, worked solutions and planted styles are `styles.py`, prompt
rendering and a run's prompt stream `prompts.py`. Every name imports from `taopd.data`.
"""

from __future__ import annotations

from .answers import answers_match, extract_answer, numbers_equal, parse_number, reference_answer
from .prompts import PromptStream, render_prompt
from .styles import (
    WORKED_SOLUTIONS,
    NoTags,
    StyleTagger,
    make_tagger,
    style_positions,
    styled_solution,
    token_texts,
    worked_chain_sum,
)
from .tasks import SPLITS, Example, FileTask, ReasoningGymTask, Task, make_task, size_notice

__all__ = [
    "SPLITS",
    "WORKED_SOLUTIONS",
    "NoTags",
    "token_texts",
    "Example",
    "answers_match",
    "FileTask",
    "PromptStream",
    "ReasoningGymTask",
    "Task",
    "extract_answer",
    "make_task",
    "numbers_equal",
    "parse_number",
    "reference_answer",
    "render_prompt",
    "size_notice",
    "worked_chain_sum",
    "styled_solution",
    "style_positions",
    "StyleTagger",
    "make_tagger",
]

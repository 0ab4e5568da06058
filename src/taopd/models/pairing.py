"""Whether a student and a teacher can be paired for a run: two different models (not one
model twice), one tokenizer (ids and special tokens), lm_heads that cover it, and contexts long
enough for the run's prompts.

Each check takes models or their meta-device skeletons (`models.model_skeleton`): only configs
and shapes are read, so they run before any weights load.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from taopd.errors import UserError

from .heads import lm_head

__all__ = [
    "TokenizerMismatchError",
    "check_distinct",
    "check_context",
    "check_tokenizers",
    "max_context",
    "shared_vocab_size",
]


class TokenizerMismatchError(UserError):
    """Student and teacher tokenizers disagree, so their token ids cannot be compared."""


def _tensor_index(folder: Path) -> dict[str, tuple[Path, str, tuple[int, ...], int, int]]:
    """name -> (file, dtype, shape, first byte, end byte) of every tensor in the folder's
    *.safetensors files, from their headers alone."""
    index = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, v in header.items():
            if name != "__metadata__":
                start, end = v["data_offsets"]
                index[name] = (f, v["dtype"], tuple(v["shape"]), 8 + n + start, 8 + n + end)
    return index


def _same_bytes(a: tuple, b: tuple, chunk: int = 1 << 24) -> bool:
    """Whether two tensors of `_tensor_index` hold the same bytes (read a chunk at a time)."""
    with open(a[0], "rb") as fa, open(b[0], "rb") as fb:
        fa.seek(a[3])
        fb.seek(b[3])
        left = a[4] - a[3]
        while left > 0:
            size = min(chunk, left)
            if fa.read(size) != fb.read(size):
                return False
            left -= size
    return True


def identical_weights(a: str | Path, b: str | Path) -> bool:
    """Whether two saved model folders hold the same weights: the same tensor names, dtypes and
    shapes, and byte-equal tensors of the first layer, the embeddings and the lm_head (a fine-tune
    changes those). False when either has no readable safetensors files."""
    try:
        ia, ib = _tensor_index(Path(a)), _tensor_index(Path(b))
        if not ia or {k: v[1:3] for k, v in ia.items()} != {k: v[1:3] for k, v in ib.items()}:
            return False
        probe = [k for k in ia if re.search(r"\.0\.|embed|wte|lm_head", k)] or list(ia)
        probe.sort(key=lambda k: ia[k][4] - ia[k][3])  # small first: a difference shows early
        return all(_same_bytes(ia[k], ib[k]) for k in probe)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False  # a damaged file: the weight-file check names it


def check_distinct(student: str, teacher: str, student_name: str, teacher_name: str) -> None:
    """Refuse a teacher that is the student: the same folder, identical weights or the same hub
    id (`student`, `teacher`: resolved names). Distilling a model into itself scores zero at
    every position, so nothing would train."""
    same_dir = Path(student).is_dir() and Path(teacher).is_dir()
    if same_dir and Path(student).resolve() == Path(teacher).resolve():
        why = "are the same model folder"
    elif same_dir and identical_weights(student, teacher):
        why = "hold identical weights"
    elif not same_dir and student == teacher:
        why = "are the same model"
    else:
        return
    raise UserError(
        f"student '{student_name}' and teacher '{teacher_name}' {why}: distilling a model into "
        "itself gives zero signals and zero loss at every position, so nothing would train; "
        "give a stronger or fine-tuned teacher (or teacher_sft, to fine-tune it on the task first)"
    )


def _special(tok: Any, kind: str) -> tuple[str | None, int | None]:
    """(token, id) of the tokenizer's `kind` special token ('eos', 'pad' or 'bos')."""
    return getattr(tok, f"{kind}_token", None), getattr(tok, f"{kind}_token_id", None)


def check_tokenizers(
    student_tok: Any, teacher_tok: Any, student_name: str, teacher_name: str
) -> None:
    """Raise TokenizerMismatchError unless both tokenizers map the same tokens to the same ids.

    Distillation compares the two distributions id by id, so the vocabularies and the special
    tokens must agree exactly. A different chat template only warns: prompts are rendered with
    the student's template for both models.
    """
    who = f"student '{student_name}' and teacher '{teacher_name}'"
    problems: list[str] = []
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        parts = [f"vocabulary sizes {len(sv):,} (student) vs {len(tv):,} (teacher)"]
        moved = sorted((i, t) for t, i in sv.items() if t in tv and tv[t] != i)
        if moved:
            ex = ", ".join(f"{t!r}: {i} vs {tv[t]}" for i, t in moved[:3])
            parts.append(f"{len(moved):,} shared tokens have different ids (e.g. {ex})")
        only_s = sorted((i, t) for t, i in sv.items() if t not in tv)
        only_t = sorted((i, t) for t, i in tv.items() if t not in sv)
        if only_s:
            ex = ", ".join(repr(t) for _, t in only_s[:3])
            parts.append(f"{len(only_s):,} tokens only in the student's (e.g. {ex})")
        if only_t:
            ex = ", ".join(repr(t) for _, t in only_t[:3])
            parts.append(f"{len(only_t):,} tokens only in the teacher's (e.g. {ex})")
        problems.append("; ".join(parts))
    for kind in ("eos", "pad", "bos"):
        s, t = _special(student_tok, kind), _special(teacher_tok, kind)
        if s != t:
            problems.append(
                f"{kind} token {s[0]!r} (id {s[1]}) in the student vs {t[0]!r} (id {t[1]}) "
                "in the teacher"
            )
    if problems:
        raise TokenizerMismatchError(
            f"the tokenizers of {who} differ: "
            + " | ".join(problems)
            + ". On-policy distillation needs one shared tokenizer; pick models of one family."
        )
    s_tpl = getattr(student_tok, "chat_template", None)
    t_tpl = getattr(teacher_tok, "chat_template", None)
    if s_tpl != t_tpl:
        warnings.warn(
            f"the chat templates of {who} differ; prompts use the student's template for both",
            stacklevel=2,
        )


def shared_vocab_size(
    tokenizer: Any, student_model: nn.Module, teacher_model: nn.Module | None
) -> int:
    """Number of vocabulary rows both models score: len(tokenizer); padded lm_heads are trimmed.

    teacher_model None (a teacher served over HTTP) checks the student only.
    """
    n = len(tokenizer)
    for role, model in (("student", student_model), ("teacher", teacher_model)):
        if model is None:
            continue
        rows = lm_head(model).shape[0]
        if rows < n:
            config = getattr(model, "config", None)
            name = getattr(config, "_name_or_path", "") or type(model).__name__
            raise UserError(
                f"the {role} model {name} has {rows:,} lm_head rows but the tokenizer has "
                f"{n:,} tokens: the tokenizer does not belong to this model"
            )
    return n


def max_context(model: Any) -> int | None:
    """The longest sequence a model's position embeddings cover (None: not stated)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(
    models: dict[str, Any], tokenizer: Any, render: Any, cfg: Any, train_qs: list, test_qs: list
) -> None:
    """Refuse, before any rollout, prompts + new tokens longer than a model's context.

    Training prompts are cut at rollout.max_prompt_tokens; test prompts (evaluation and the
    held-out bank) are used whole.
    """

    def longest(questions: list[str]) -> int:
        if not questions:
            return 0
        ids = tokenizer([render(q) for q in questions], add_special_tokens=False)["input_ids"]
        return max(len(x) for x in ids)

    ro = cfg.rollout
    train_need = min(ro.max_prompt_tokens, longest(train_qs)) + ro.max_new_tokens
    new_test = max(ro.max_new_tokens, cfg.eval.max_new_tokens)
    test_need = longest(test_qs) + new_test
    for role, model in models.items():  # a served teacher (None) states no context here
        limit = max_context(model) if model is not None else None
        if limit is None:
            continue
        if train_need > limit:
            raise UserError(
                f"training prompts of up to {train_need - ro.max_new_tokens} tokens + "
                f"rollout.max_new_tokens={ro.max_new_tokens} exceed the {role}'s context "
                f"({limit} positions, max_position_embeddings); lower rollout.max_prompt_tokens "
                "or rollout.max_new_tokens"
            )
        if test_need > limit:
            raise UserError(
                f"test prompts of up to {test_need - new_test} tokens + {new_test} new tokens "
                f"exceed the {role}'s context ({limit} positions, max_position_embeddings); "
                "lower eval.max_new_tokens / rollout.max_new_tokens or use shorter prompts"
            )

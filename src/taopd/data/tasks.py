"""Tasks: reasoning-gym generators and local JSONL/JSON/parquet files, each yielding `Example`s
for a split and scoring a completion against one. Test examples never share a question with the
train split of the same seed, so held-out accuracy is held out.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taopd.errors import UserError

from .answers import answers_match, extract_answer, reference_answer
from .styles import WORKED_SOLUTIONS

SPLITS = ("train", "test", "validation")


@dataclass
class Example:
    """One problem: the question shown to the model, its reference answer, and the raw entry.

    `solution` is the full target text for supervised fine-tuning (a worked solution ending in
    the answer); None means the bare answer is the target."""

    question: str
    answer: str
    entry: dict[str, Any] | None = field(default=None, repr=False)  # reasoning-gym entry / row
    solution: str | None = None

    @property
    def target(self) -> str:
        """What supervised fine-tuning trains on: the worked solution, else the answer."""
        return self.answer if self.solution is None else self.solution


class Task:
    """A source of examples with a scorer; subclasses implement both methods."""

    name: str = "task"

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` examples of `split` ('train' or 'test'), deterministic in `seed`."""
        raise NotImplementedError

    def score(self, completion: str, ex: Example) -> float:
        """Reward in [0, 1] of a completion for `ex` (1.0 correct)."""
        raise NotImplementedError

    def correct(self, completion: str, ex: Example) -> bool:
        """True if the completion fully solves `ex` (score 1)."""
        return self.score(completion, ex) >= 1.0 - 1e-9


def _check_split(split: str) -> None:
    """Raise UserError for an unknown split name."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


class ReasoningGymTask(Task):
    """A reasoning-gym generator; train and test draw from disjoint seed ranges, then dedup.

    reasoning-gym makes item i of seed s from `Random(s + i)`, so seeds s and s+1 give the same
    items shifted by one: the splits use bases `seed * 10**7` and `seed * 10**7 + 5 * 10**6`
    (disjoint up to 5 M train items; validation from `+ 7.5 * 10**6`), and test questions that
    also occur among the first `holdout` train questions are dropped (small problem spaces
    repeat questions by chance).
    """

    _STRIDE = 10**7
    _TEST_OFFSET = 5 * 10**6
    _VALIDATION_OFFSET = 7_500_000

    def __init__(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        suffix: str | None = None,
        holdout: int = 1000,
        solution: str = "answer",
    ) -> None:
        import reasoning_gym

        if solution not in ("answer", "worked"):
            raise UserError(f"task.solution must be 'answer' or 'worked', got {solution!r}")
        if solution == "worked" and name not in WORKED_SOLUTIONS:
            raise UserError(
                f"task.solution 'worked': taopd writes worked solutions only for "
                f"{', '.join(sorted(WORKED_SOLUTIONS))}, not {name!r}"
            )
        self.name = name
        self.params = dict(params or {})
        self.suffix = suffix
        self.holdout = holdout
        self.solution = solution
        try:
            self._scorer = reasoning_gym.create_dataset(name, size=1, seed=0, **self.params)
        except Exception as err:  # unknown name -> ValueError, bad params -> TypeError / assert
            raise UserError(
                f"cannot create reasoning-gym task {name!r} with {self.params}: {err}"
            ) from None

    def _base_seed(self, split: str, seed: int) -> int:
        """First RNG seed of the split's item stream."""
        offset = {"train": 0, "test": self._TEST_OFFSET, "validation": self._VALIDATION_OFFSET}
        return seed * self._STRIDE + offset[split]

    def _entries(self, split: str, n: int, seed: int, start: int = 0) -> list[dict[str, Any]]:
        """Items start..start+n-1 of the split's stream."""
        import reasoning_gym

        ds = reasoning_gym.create_dataset(
            self.name, size=start + n, seed=self._base_seed(split, seed), **self.params
        )
        return [ds[i] for i in range(start, start + n)]

    def _example(self, entry: dict[str, Any]) -> Example:
        """Wrap an entry, appending the task's instruction suffix to the question."""
        question = entry["question"]
        if self.suffix:
            question = f"{question} {self.suffix}"
        solution = WORKED_SOLUTIONS[self.name](entry) if self.solution == "worked" else None
        return Example(
            question=question, answer=str(entry["answer"]), entry=entry, solution=solution
        )

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` examples of `split`; test ones never repeat a question of the train split's head,
        validation ones no question of the first `max(holdout, 4n, 4000)` train or test items."""
        _check_split(split)
        if split == "train":
            return [self._example(e) for e in self._entries("train", n, seed)]
        seen: set[str] = set()
        if self.holdout > 0:
            seen = {e["question"] for e in self._entries("train", self.holdout, seed)}
        if split == "validation":  # nor a question of the train or test streams' heads
            guard = max(self.holdout, 4 * n, 4000)
            seen |= {
                e["question"] for s in ("train", "test") for e in self._entries(s, guard, seed)
            }
        out: list[Example] = []
        start = 0
        while len(out) < n:
            chunk = max(2 * (n - len(out)), 64)
            for e in self._entries(split, chunk, seed, start):
                if e["question"] not in seen:
                    out.append(self._example(e))
                    if len(out) == n:
                        break
            start += chunk
            if start > 100 * n + 10_000:
                raise UserError(
                    f"reasoning-gym task {self.name!r}: could not find {n} {split} questions "
                    f"outside the train split (params {self.params} give too few distinct ones)"
                )
        return out

    def score(self, completion: str, ex: Example) -> float:
        """The dataset's own `score_answer` on the extracted answer."""
        if ex.entry is None:
            raise ValueError("a reasoning-gym example needs its entry to be scored")
        answer = extract_answer(completion)
        return float(self._scorer.score_answer(answer=answer, entry=ex.entry))


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl / .json / .parquet file as dicts."""
    suffix = path.suffix.lower()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read task file {path}: {e.strerror}") from None
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not raw:
            raise UserError(f"task file {path} is empty (0 bytes), not a parquet file")
        try:
            return pq.read_table(pa.BufferReader(raw)).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"task file {path} is not a readable parquet file ({first})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); re-save the file "
            "as UTF-8"
        ) from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines in a .json file
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1:
                return lists[0]
            raise UserError(f"{path}: expected a list of records (or one key holding one)")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
    return rows


def _hash_split(question: str) -> str:
    """'test' for a deterministic ~10% of questions (by SHA-256 of the text), else 'train'."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 10 == 0 else "train"


_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "test": "test",
    "eval": "test",
    "validation": "test",
    "valid": "test",
    "val": "test",
}


class FileTask(Task):
    """Questions and reference answers from a local .jsonl, .json or .parquet file.

    A `split` column picks the split (train / test; eval and validation count as test);
    without it a hash of the question puts ~10% in test. GSM8K-style answers ('... #### 42')
    are reduced to the final value; numbers compare by value, other answers exactly.
    """

    def __init__(
        self,
        path: str | Path,
        prompt_field: str = "question",
        answer_field: str = "answer",
        suffix: str | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self.name = self.path.stem
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.suffix = suffix
        if not self.path.is_file():
            raise UserError(f"task file {self.path} does not exist")
        if self.path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
            raise UserError(f"task file {self.path}: use a .jsonl, .json or .parquet file")
        rows = _read_records(self.path)
        if not rows:
            raise UserError(f"task file {self.path} holds no records")
        if not all(isinstance(r, dict) for r in rows):
            raise UserError(f"task file {self.path}: every record must be a JSON object")
        present = sorted({k for r in rows for k in r})
        for role, fld in (("prompt_field", prompt_field), ("answer_field", answer_field)):
            missing = sum(1 for r in rows if r.get(fld) in (None, ""))
            if missing:
                raise UserError(
                    f"task file {self.path}: {missing} of {len(rows)} records lack the "
                    f"{role} {fld!r}; fields present: {', '.join(present)}"
                )
        self._splits: dict[str, list[Example]] = {"train": [], "test": []}
        for row in rows:
            question = str(row[prompt_field])
            if "split" in row and row["split"] is not None:
                label = str(row["split"]).strip().lower()
                split = _SPLIT_ALIASES.get(label)
                if split is None:
                    raise UserError(
                        f"task file {self.path}: unknown split {row['split']!r} "
                        f"(use {', '.join(sorted(_SPLIT_ALIASES))})"
                    )
            else:
                split = _hash_split(question)
            if suffix:
                question = f"{question} {suffix}"
            ex = Example(question=question, answer=reference_answer(row[answer_field]), entry=row)
            self._splits[split].append(ex)

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` examples in seeded order; train cycles over reshuffled epochs, test stops at all."""
        _check_split(split)
        if split == "validation":
            raise UserError(
                f"task file {self.path}: a file task has train and test splits only (its "
                "'validation' rows count as test); choosing settings on a validation split "
                "(eval.split: validation, taopd compare --lr-grid) needs a reasoning-gym task"
            )
        pool = self._splits[split]
        if not pool:
            raise UserError(f"task file {self.path} has no {split} examples")
        rng = random.Random(f"{seed}:{split}")
        out: list[Example] = []
        while len(out) < n:
            order = list(pool)
            rng.shuffle(order)
            out.extend(order[: n - len(out)])
            if split == "test":
                break
        return out

    def score(self, completion: str, ex: Example) -> float:
        """1.0 if the extracted answer matches the reference (`answers_match`), else 0.0."""
        return 1.0 if answers_match(extract_answer(completion), ex.answer) else 0.0


def make_task(cfg: dict[str, Any]) -> Task:
    """A task from a config dict: {'name': ..., 'params': {...}} or {'path': ..., fields...}.

    Both accept 'suffix', an instruction appended to every question (e.g. 'Answer with only
    the number.'); reasoning-gym tasks also take 'holdout' (train questions kept out of test)
    and 'solution' ('worked': examples carry a worked solution as their fine-tuning target).
    """
    cfg = dict(cfg)
    suffix = cfg.pop("suffix", None)
    if "path" in cfg:
        path = cfg.pop("path")
        allowed = {"prompt_field", "answer_field"}
        if unknown := set(cfg) - allowed - {"name"}:
            raise UserError(
                f"file task: unknown keys {sorted(unknown)} (allowed: path, suffix, "
                f"{', '.join(sorted(allowed))})"
            )
        return FileTask(
            path,
            prompt_field=cfg.get("prompt_field", "question"),
            answer_field=cfg.get("answer_field", "answer"),
            suffix=suffix,
        )
    if "name" in cfg:
        name = cfg.pop("name")
        params = cfg.pop("params", None) or {}
        holdout = cfg.pop("holdout", 1000)
        solution = cfg.pop("solution", "answer")
        if cfg:
            raise UserError(
                f"reasoning-gym task: unknown keys {sorted(cfg)} "
                "(allowed: name, params, suffix, holdout, solution)"
            )
        return ReasoningGymTask(name, params, suffix=suffix, holdout=holdout, solution=solution)
    raise UserError("a task config needs 'name' (a reasoning-gym task) or 'path' (a local file)")

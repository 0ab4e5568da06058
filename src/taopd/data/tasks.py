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


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """Rows of a .jsonl / .json / .parquet file, each with where it is ('line 7' of a JSONL
    file, 'record 7' of a JSON list or parquet table, counted from 1)."""
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
            rows = pq.read_table(pa.BufferReader(raw)).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"task file {path} is not a readable parquet file ({first})") from None
        return [(f"record {i}", row) for i, row in enumerate(rows, 1)]
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
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise UserError(f"{path}: expected a list of records (or one key holding one)")
            data = lists[0]
        if isinstance(data, list):
            return [(f"record {i}", row) for i, row in enumerate(data, 1)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
    return rows


def _hash_split(question: str) -> str:
    """'test' for a deterministic ~10% of questions (by SHA-256 of the text), else 'train'."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 10 == 0 else "train"


def _lines(where: list[str]) -> str:
    """'line 2' / 'lines 2, 5, 9, ...' (the first five)."""
    nums = [w.split()[-1] for w in where]
    kind = where[0].split()[0] + ("s" if len(where) > 1 else "")
    return f"{kind} {', '.join(nums[:5])}{', ...' if len(nums) > 5 else ''}"


def _check_records(
    path: Path, records: list[tuple[str, Any]], prompt_field: str, answer_field: str
) -> None:
    """Every record an object with a question and an answer; else name the first bad one's line
    (and how many more)."""
    bad = [where for where, row in records if not isinstance(row, dict)]
    if bad:
        raise UserError(
            f"task file {path}, {bad[0]}: every record must be a JSON object ({len(bad)} of "
            f"{len(records)} are not: {_lines(bad)})"
        )
    for role, fld in (("prompt_field", prompt_field), ("answer_field", answer_field)):
        missing = [(where, row) for where, row in records if row.get(fld) in (None, "")]
        if missing:
            (where, row), lines = missing[0], _lines([w for w, _ in missing])
            raise UserError(
                f"task file {path}, {where}: the record has no {fld!r} (task.{role}); "
                f"{len(missing)} of {len(records)} records lack it ({lines}); "
                f"fields of that record: {', '.join(sorted(row)) or 'none'}"
            )


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
            cwd = Path.cwd()
            where = "" if self.path.is_absolute() else f" (looked in the working directory, {cwd})"
            raise UserError(f"task file {self.path} does not exist{where}")
        if self.path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
            raise UserError(f"task file {self.path}: use a .jsonl, .json or .parquet file")
        records = _read_records(self.path)
        if not records:
            raise UserError(f"task file {self.path} holds no records")
        _check_records(self.path, records, prompt_field, answer_field)
        self._splits: dict[str, list[Example]] = {"train": [], "test": []}
        self._labelled = 0  # records with a "split" field (the rest are split by hash)
        for where, row in records:
            question = str(row[prompt_field])
            split = self._split_of(where, row, question)
            if suffix:
                question = f"{question} {suffix}"
            ex = Example(question=question, answer=reference_answer(row[answer_field]), entry=row)
            self._splits[split].append(ex)

    def _split_of(self, where: str, row: dict[str, Any], question: str) -> str:
        """The record's split: its "split" field when it has one, else by a hash of the question."""
        if row.get("split") is None:
            return _hash_split(question)
        self._labelled += 1
        split = _SPLIT_ALIASES.get(str(row["split"]).strip().lower())
        if split is None:
            raise UserError(
                f"task file {self.path}, {where}: unknown split {row['split']!r} "
                f"(use {', '.join(sorted(_SPLIT_ALIASES))})"
            )
        return split

    def split_rule(self) -> str:
        """How the file's records were split, with the test share (for size notices)."""
        n_test = len(self._splits["test"])
        total = n_test + len(self._splits["train"])
        if self._labelled == total:
            how = 'by its "split" field'
        elif self._labelled == 0:
            how = 'by a hash of the question, ~10% to test; a "split" field chooses'
        else:
            how = f'by the "split" field of {self._labelled} records, the rest by a hash'
        return f"split {how}: {n_test} of {total} records are test problems"

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


def size_notice(task: Task, split: str, requested: int, got: int, key: str) -> str | None:
    """The notice of a requested size (`key`, e.g. task.n_test) cut to the `got` problems the
    task's split holds; None when nothing was cut."""
    if got >= requested:
        return None
    source, rule = task.name, ""
    if isinstance(task, FileTask):
        source, rule = task.path.name, f" ({task.split_rule()})"
    return f"{key} {requested} > {got} {split} problems in {source}{rule}: using {got}"


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

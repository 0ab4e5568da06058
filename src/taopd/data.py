"""Tasks (reasoning-gym generators, local JSONL/JSON/parquet files), prompts, answer checks.

A task yields `Example`s for a split and scores a completion against one. Test examples never
share a question with the train split of the same seed, so held-out accuracy is held out.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taopd.errors import UserError

__all__ = [
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
    "worked_chain_sum",
    "styled_solution",
    "style_positions",
    "StyleTagger",
    "make_tagger",
]

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


# ---------------------------------------------------------------------------------------------
# Answers

_EOS_REMNANTS = re.compile(r"<\|[^|<>]{1,40}\|>|</s>|<s>|<eos>|<pad>|\[/?INST\]")
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} (braces balanced), as MATH-style solutions give it."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(completion: str) -> str:
    """The final answer: after the last '####', in <answer>, in the last \\boxed{}, last number.

    Special-token remnants (`<|im_end|>`, `</s>`, ...) are removed first; a number loses its
    thousands commas and `$` so '1,234' and '$1234' both give '1234'.
    """
    text = _EOS_REMNANTS.sub(" ", completion)
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else ""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    if numbers:
        return re.sub(r"[\s,$]", "", numbers[-1])
    return text.strip()


def parse_number(text: str) -> float | None:
    """`text` as a float after dropping commas, `$`, `%`, spaces and a final period; else None."""
    cleaned = re.sub(r"[,$%\s]", "", text.strip()).rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def numbers_equal(a: str, b: str) -> bool:
    """True if both strings are numbers of equal value (relative tolerance 1e-9)."""
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    return abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y))


def reference_answer(answer: Any) -> str:
    """A reference answer as a string; GSM8K's '... #### 42' becomes '42'."""
    text = str(answer).strip()
    boxed = _last_boxed(text)
    if boxed is not None:  # a MATH-style full solution
        return boxed
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
        num = parse_number(text)
        if num is not None:
            text = re.sub(r"[,$\s]", "", text).rstrip(".")
    return text


_MATHY = re.compile(r"[\d\\^{}=+\-*/()\[\]]")  # a digit, LaTeX or an operator: worth parsing


def _math_verify(got: str, ref: str) -> bool:
    r"""LaTeX-aware equivalence by math-verify (`\frac{1}{2}` = `0.5`, sets, intervals, ...).

    Both sides are parsed as \boxed{...} answers; its signal-based timeout works only in the
    main thread, so other threads parse without one.
    """
    import threading

    from math_verify import parse, verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"\\boxed{{{ref}}}", parsing_timeout=limit)
        pred = parse(f"\\boxed{{{got}}}", parsing_timeout=limit)
        return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=limit))
    except Exception:  # math-verify raises on unparsable or timed-out input: not a match
        return False


def answers_match(got: str, ref: str) -> bool:
    """True if an extracted answer equals the reference: numbers by value (GSM8K's `#### N`),
    then exact text, then math-verify's LaTeX-aware equivalence (MATH-style answers; plain words
    are never sent to it, since it reads them as products of symbols)."""
    got, ref = got.strip(), ref.strip()
    if parse_number(ref) is not None and parse_number(got) is not None:
        return numbers_equal(got, ref)
    if got == ref:
        return True
    if not (_MATHY.search(got) and _MATHY.search(ref)):  # words: exact ('paris' ≠ 'Paris')
        return False
    return _math_verify(got, ref)


# ---------------------------------------------------------------------------------------------
# Worked solutions

_TERM = re.compile(r"\s*([+-])\s*(\d+)")


def worked_chain_sum(expression: str) -> str:
    """A chain-of-thought solution of a reasoning-gym `chain_sum` expression ('12 + 34 - 5'):
    one running partial sum per line, then '#### answer' (what `extract_answer` reads)."""
    text = expression.strip()
    head = re.match(r"-?\d+", text)
    if head is None:
        raise ValueError(f"not a chain_sum expression: {expression!r}")
    total = int(head.group())
    rest = text[head.end() :]
    terms = _TERM.findall(rest)
    if "".join(f"{op}{n}" for op, n in terms) != re.sub(r"\s", "", rest):
        raise ValueError(f"not a chain_sum expression: {expression!r}")
    lines = []
    for op, n in terms:
        new = total + int(n) if op == "+" else total - int(n)
        lines.append(f"{total} {op} {n} = {new}")
        total = new
    return "\n".join([*lines, f"#### {total}"])


def styled_solution(solution: str, marker: str, where: str = "line", every: int = 1) -> str:
    """A worked solution rewritten in a teacher style (the `mismatch` recipe): `marker` at the
    start of step lines 0, every, 2·every, ... (`where="line"`) or after their '= '
    (`where="result"`). The final '#### answer' line is never marked, so the scorer reads the same
    answer in both styles."""
    out = []
    step = 0
    for line in solution.split("\n"):
        if line.startswith("####"):
            out.append(line)
            continue
        if step % every == 0:
            if where == "line":
                line = marker + line
            elif " = " in line:
                head, tail = line.rsplit(" = ", 1)
                line = f"{head} = {marker}{tail}"
        out.append(line)
        step += 1
    return "\n".join(out)


def style_positions(token_texts: list[str], marker: str, where: str = "line") -> list[bool]:
    """Which response positions are planted-style slots: where the styled teacher writes its
    marker (a step line's start, or right after '= ' for `where="result"`), or any token that
    carries the marker's characters. The slot before a '####' line is not one (never marked).
    A prefix walk over the decoded tokens: position t is judged on the text before it."""
    core = marker.strip() or marker
    tags: list[bool] = []
    text = ""
    for tok in token_texts:
        line = text.rsplit("\n", 1)[-1]
        if where == "line":
            slot = line.strip() == "" and not tok.lstrip().startswith("#") and tok.strip() != ""
        else:
            slot = line.rstrip().endswith("=") and "=" not in tok and tok.strip() != ""
        tags.append(slot or core in tok)
        text += tok
    return tags


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text as it reads in the decoded sequence (a prefix walk, so characters split
    over byte-level tokens land on the token that completes them)."""
    out, prev = [], ""
    for t in range(len(ids)):
        text = tokenizer.decode(ids[: t + 1])
        out.append(text[len(prev) :] if text.startswith(prev) else tokenizer.decode([ids[t]]))
        prev = text
    return out


class StyleTagger:
    """Tags the planted-style positions of response tokens (`teacher_sft.style`), so metrics,
    samples and the diagnostic can be split by position kind (style vs other)."""

    kinds = ("style", "other")

    def __init__(self, tokenizer: Any, marker: str, where: str = "line") -> None:
        self.tokenizer, self.marker, self.where = tokenizer, marker, where

    def row(self, ids: list[int]) -> list[bool]:
        """One response's tags (its valid tokens in order)."""
        return style_positions(token_texts(self.tokenizer, ids), self.marker, self.where)

    def __call__(self, ids: Any, valid: Any) -> Any:
        """Bool tags [B, T] of response ids [B, T] at the valid positions (False elsewhere)."""
        import torch

        out = torch.zeros_like(valid, dtype=torch.bool)
        for b in range(valid.shape[0]):
            idx = valid[b].nonzero().squeeze(-1)
            if idx.numel():
                tags = self.row(ids[b, idx].tolist())
                out[b, idx] = torch.tensor(tags, dtype=torch.bool, device=valid.device)
        return out


class NoTags:
    """The tagger of a setting without a planted style: no position kinds."""

    kinds: tuple[str, ...] = ()

    def __call__(self, ids: Any, valid: Any) -> None:
        return None


def make_tagger(style: Any, tokenizer: Any) -> StyleTagger | NoTags:
    """The position tagger of a run: planted-style tags when the teacher has a `style`."""
    return NoTags() if style is None else StyleTagger(tokenizer, style.marker, style.where)


WORKED_SOLUTIONS = {"chain_sum": lambda entry: worked_chain_sum(entry["metadata"]["expression"])}
"""reasoning-gym tasks with a worked-solution writer (`task.solution: worked`)."""


# ---------------------------------------------------------------------------------------------
# Tasks


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


# ---------------------------------------------------------------------------------------------
# Prompts


def render_prompt(
    tokenizer: Any, question: str, system_prompt: str | None = None, chat_template: bool = True
) -> str:
    """The model's input text: the chat template with a generation prompt, or question + '\\n'."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if system_prompt:
        return f"{system_prompt}\n{question}\n"
    return question + "\n"


# ---------------------------------------------------------------------------------------------
# The prompt stream of a training run


class PromptStream:
    """The train split as rendered prompts, a seeded shuffle per epoch, batch after batch.

    `position` (examples drawn so far) survives resume, so a resumed run sees the prompts the
    uninterrupted one would have. Each process takes its share of every global batch; prompts
    over rollout.max_prompt_tokens are cut to their last tokens or skipped, counted over all
    processes.
    """

    def __init__(
        self,
        examples: list[Example],
        render: Any,
        tokenizer: Any,
        seed: int,
        max_prompt_tokens: int,
        overflow: str,
        group: Any,
    ) -> None:
        self.examples, self.render, self.tokenizer, self.seed = examples, render, tokenizer, seed
        self.max_prompt_tokens, self.overflow, self.group = max_prompt_tokens, overflow, group
        self.position = 0
        self.skipped = self.truncated = 0
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        """The seeded shuffle of the train split for `epoch` (recomputed only when it changes)."""
        import torch

        from taopd import seeds

        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(seeds.epoch_order(self.seed, epoch))
            self._order = (epoch, torch.randperm(len(self.examples), generator=gen).tolist())
        return self._order[1]

    def next_examples(self, batch_size: int) -> list[Example]:
        """This process's share of the next global batch of `batch_size` examples."""
        picked = []
        for j in range(batch_size):
            epoch, idx = divmod(self.position + j, len(self.examples))
            picked.append(self.examples[self._epoch_order(epoch)[idx]])
        self.position += batch_size
        per = batch_size // self.group.world
        return picked[self.group.rank * per : (self.group.rank + 1) * per]

    def next_prompts(self, batch_size: int) -> list[str]:
        """The rendered prompts of this process's share of the next batch, fitted to the limit."""
        return self.fit([self.render(ex.question) for ex in self.next_examples(batch_size)])

    def fit(self, prompts: list[str]) -> list[str]:
        """Apply rollout.max_prompt_tokens: keep the last tokens (truncate) or drop (skip).

        The skipped / truncated counts are summed over all processes (every one calls this)."""
        limit = self.max_prompt_tokens
        kept, truncated, skipped = [], 0, 0
        for p in prompts:
            ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
            if len(ids) <= limit:
                kept.append(p)
            elif self.overflow == "truncate":
                truncated += 1
                kept.append(self.tokenizer.decode(ids[-limit:]))
            else:
                skipped += 1
        truncated, skipped = self.group.sum_counts(truncated, skipped)
        self.truncated += truncated
        self.skipped += skipped
        return kept

    def state(self) -> dict[str, int]:
        """What a checkpoint keeps of the stream."""
        return {
            "data_pos": self.position,
            "skipped_prompts": self.skipped,
            "truncated_prompts": self.truncated,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.position = state["data_pos"]
        self.skipped = state.get("skipped_prompts", 0)
        self.truncated = state.get("truncated_prompts", 0)

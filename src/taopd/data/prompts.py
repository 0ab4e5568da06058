"""Prompts: a question rendered for the model (chat template or plain), and a training run's
prompt stream (a seeded shuffle per epoch, each process's share, the length limit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tasks import Example


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
        self.last_examples: list[Example] = []  # the examples of the last `next_prompts`
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
        """The rendered prompts of this process's share of the next batch, fitted to the limit;
        `last_examples` holds their examples, in the same order (to grade the rollouts)."""
        examples = self.next_examples(batch_size)
        fitted = self._fit([self.render(ex.question) for ex in examples])
        self.last_examples = [ex for ex, p in zip(examples, fitted, strict=True) if p is not None]
        return [p for p in fitted if p is not None]

    def fit(self, prompts: list[str]) -> list[str]:
        """Apply rollout.max_prompt_tokens: keep the last tokens (truncate) or drop (skip).

        The skipped / truncated counts are summed over all processes (every one calls this)."""
        return [p for p in self._fit(prompts) if p is not None]

    def _fit(self, prompts: list[str]) -> list[str | None]:
        """`fit`, with None in place of each skipped prompt."""
        limit = self.max_prompt_tokens
        kept: list[str | None] = []
        truncated = skipped = 0
        for p in prompts:
            ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
            if len(ids) <= limit:
                kept.append(p)
            elif self.overflow == "truncate":
                truncated += 1
                kept.append(self.tokenizer.decode(ids[-limit:]))
            else:
                skipped += 1
                kept.append(None)
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

"""Tiny offline pieces for the TRL integration tests: a word-level tokenizer, random Llamas,
prompts, and the TRL config; also run under `accelerate launch` as two ranks (see `main`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

WORDS = ["what", "is", "plus", "minus", "?", "the", "answer", "so"] + [str(i) for i in range(40)]


def word_tokenizer():
    """A word-level tokenizer (whitespace split) as a transformers fast tokenizer, left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    return fast


def tiny_llama(vocab: int, seed: int, hidden: int = 16, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


def prompts(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [f"what is {rng.randint(0, 19)} plus {rng.randint(0, 19)} ?" for _ in range(n)]


def config(out: Path, **kw):
    from taopd.integrations.trl import TeachabilityDistillationConfig

    base = dict(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=1,
        max_completion_length=6, max_steps=1, learning_rate=1e-2, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to=[], logging_steps=1, use_cpu=True, seed=0,
        save_strategy="no", beta=1.0, selection_ratio=0.3, selection_k=4,
        dataloader_num_workers=0,
    )  # fmt: skip
    base.update(kw)
    return TeachabilityDistillationConfig(**base)


def dense_completion_logits(model, batch: dict) -> torch.Tensor:
    """[B, C, V] logits at the completion positions, from the full model (the dense path)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    c = batch["completion_ids"].size(1)
    return model(input_ids=ids, attention_mask=mask).logits[:, -c - 1 : -1]


def main(out: str) -> None:
    """One rank of the two-process test: one TRL step in select mode, then one in weight mode
    (teachability weights); each rank writes its batch and its mask or weights per mode."""
    from datasets import Dataset

    from taopd.integrations.trl import TeachabilityDistillationTrainer
    from taopd.integrations.trl_weights import WEIGHT_KEY

    class Recording(TeachabilityDistillationTrainer):
        def _taopd_select(self, batch):
            batch = super()._taopd_select(batch)
            rank = self.accelerator.process_index
            keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "tool_mask")
            record = {k: batch[k].tolist() for k in (*keys, WEIGHT_KEY) if k in batch}
            record["num_items_in_batch"] = int(batch["num_items_in_batch"])
            Path(out, f"{self.args.selection_mode}{rank}.json").write_text(json.dumps(record))
            return batch

    tok = word_tokenizer()
    for mode, ratio in (("select", 0.25), ("weight", None)):
        trainer = Recording(
            model=tiny_llama(len(tok), 0),
            teacher_model=tiny_llama(len(tok), 1),
            args=config(
                Path(out) / mode,
                per_device_train_batch_size=3,
                selection_ratio=ratio,
                selection_mode=mode,
            ),  # fmt: skip
            train_dataset=Dataset.from_dict({"prompt": prompts(12)}),
            processing_class=tok,
        )
        trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])

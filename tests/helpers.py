"""Tiny offline models and tokenizers for tests: a random Llama plus a small byte-level BPE.

`make_tiny_model_dir` writes an HF folder (model, tokenizer, ChatML chat template like
SmolLM2's, eos = pad = `<|im_end|>`) that `taopd.models.load_model` / `load_tokenizer` load.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BASE_WORDS = [
    "system", "user", "assistant", "State the final answer to the following arithmetic problem:",
    "The answer is", "Answer with only the number.", "question", "answer", "####",
]  # fmt: skip


def arithmetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Synthetic lines like '12 + 7 = 19' and chat fragments to train the tiny BPE on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        c = a + b if op == "+" else a - b
        lines.append(f"{a} {op} {b} = {c}")
    return lines


def make_tiny_tokenizer(
    vocab_size: int = 320, vocab_words: list[str] | None = None, corpus_seed: int = 0
):
    """A byte-level BPE (digits split, like SmolLM2) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = BASE_WORDS + list(vocab_words or [])
    corpus = arithmetic_corpus(400, corpus_seed) + words * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_llama(
    vocab_rows: int,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    tie_embeddings: bool = False,
    eos_id: int = 2,
    bos_id: int = 1,
):
    """A random LlamaForCausalLM with `vocab_rows` lm_head rows (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.generation_config.bos_token_id = bos_id
    return model.eval()


def make_tiny_model_dir(
    path: str | Path,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    vocab_words: list[str] | None = None,
    vocab_size: int = 320,
    extra_rows: int = 0,
    tie_embeddings: bool = False,
    corpus_seed: int = 0,
) -> Path:
    """Write a tiny random Llama + tokenizer HF folder at `path` and return it.

    Same `vocab_words` / `vocab_size` / `corpus_seed` give the same tokenizer, so two models with
    different `seed`s can act as teacher and student. `extra_rows` pads the lm_head beyond the
    tokenizer (as Qwen does); different `vocab_words` give a different vocabulary.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer(vocab_size, vocab_words, corpus_seed)
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    bos_id = tok.convert_tokens_to_ids("<|im_start|>")
    model = tiny_llama(
        len(tok) + extra_rows, seed, hidden, layers, heads, tie_embeddings, eos_id, bos_id
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

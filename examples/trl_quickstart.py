"""TA-OPD inside TRL's DistillationTrainer: a complete script, offline, seconds on a CPU.

Tiny random Llamas and a word-level tokenizer stand in for your student, teacher and tokenizer, so
nothing is downloaded; the lines marked "yours:" say what to load instead (teacher and student
must share the tokenizer). Needs `pip install 'taopd[trl]'`.

    python examples/trl_quickstart.py
"""

import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from taopd.integrations.trl import TeachabilityDistillationConfig, TeachabilityDistillationTrainer

# yours: tokenizer = AutoTokenizer.from_pretrained(STUDENT); tokenizer.padding_side = "left"
words = ["<pad>", "<eos>", "<unk>", "what", "is", "plus", "?"] + [str(i) for i in range(40)]
word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
)
tokenizer.padding_side = "left"  # TRL generates from left-padded prompts


def tiny_llama(seed: int) -> LlamaForCausalLM:
    """yours: AutoModelForCausalLM.from_pretrained(STUDENT) (or TEACHER)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1,
        eos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(config)


student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)

# TRL's DistillationTrainer reads one column, "prompt": plain text as here, or chat messages
# ([{"role": "user", "content": "..."}], rendered with the tokenizer's chat template).
# The student samples the completions itself (on-policy); other columns are ignored.
rng = random.Random(0)
ds = Dataset.from_dict(
    {"prompt": [f"what is {rng.randint(0, 19)} plus {rng.randint(0, 19)} ?" for _ in range(16)]}
)

args = TeachabilityDistillationConfig(
    output_dir="trl-quickstart", beta=1.0,   # TRL's own fields; beta=1: reverse KL
    max_steps=2, per_device_train_batch_size=4, max_completion_length=8, learning_rate=1e-4,
    bf16=False, use_cpu=True,                # drop these two on a GPU
    report_to=[], logging_steps=1, save_strategy="no",
    selection_strategy="teachability",       # any taopd strategy
    selection_ratio=0.05, selection_k=16,    # keep the top 5% of completion positions
)  # fmt: skip
trainer = TeachabilityDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                          train_dataset=ds, processing_class=tokenizer)  # fmt: skip
trainer.train()

logged = [row for row in trainer.state.log_history if "taopd/kept_positions" in row]
print(f"{len(logged)} steps; positions kept in the last: {logged[-1]['taopd/kept_positions']:.0f}")

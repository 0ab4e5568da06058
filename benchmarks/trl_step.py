#!/usr/bin/env python
"""One TRL distillation step with taopd's integration against vanilla TRL, same models and batch.

Arms, measured in one run, round-robin over the repeats, median of the repeats (generation is
excluded: both arms get the same generated batch):

  vanilla   trl.DistillationTrainer (1.16): compute_loss (teacher body, student body, TRL's
            chunked divergence over the completion positions) + backward
  taopd     TeachabilityDistillationTrainer: the scoring pass (student body no-grad, teacher
            body, signals_from_hidden, global select_tokens) + compute_loss on the kept
            positions (the teacher hidden states reused from the scoring pass) + backward
  nocache   taopd with selection_cache_teacher=False: the loss step runs the teacher again

Also the parts of the scoring pass, to say where the overhead goes. On CPU TRL's chunked loss
projects every completion position through the vocabulary whatever the mask (its compact
kept-rows path is Triton-only), so selection saves nothing inside TRL's loss here: the taopd arm
pays the scoring pass on top. On CUDA with Triton, TRL projects only kept rows.

Usage:
  python benchmarks/trl_step.py                         # SmolLM2-135M pair, 3 repeats
  python benchmarks/trl_step.py --shape tiny --repeats 1 --json out.json   # seconds (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ARMS = ("vanilla", "taopd", "nocache")


def word_tokenizer(vocab: int):
    """A word-level tokenizer over tokens t0..t{vocab-1} (t0 = pad, t1 = eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2"
    )
    fast.padding_side = "left"
    return fast


def random_llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).float()


def build(shape: str):
    """(student, teacher, tokenizer, description)."""
    if shape == "tiny":
        tok = word_tokenizer(512)
        s, t = random_llama(512, 32, 1, 0), random_llama(512, 48, 2, 1)
        return s, t, tok, "random Llamas, vocab 512, hidden 32/48"
    from taopd.models import load_model, load_tokenizer

    tok = load_tokenizer("smollm2")
    tok.padding_side = "left"
    s, t = load_model("smollm2"), load_model("smollm2")
    return s, t, tok, "SmolLM2-135M-Instruct as student and teacher (vocab 49,152, fp32)"


def make_batch(vocab: int, batch: int, prompt: int, completion: int, seed: int) -> dict:
    """A generated batch in TRL's format: left-padded prompts, right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (batch, prompt), generator=g)
    prompt_mask = torch.ones(batch, prompt, dtype=torch.long)
    completion_ids = torch.randint(3, vocab, (batch, completion), generator=g)
    lengths = torch.randint(completion // 2, completion + 1, (batch,), generator=g)
    completion_mask = (torch.arange(completion) < lengths[:, None]).long()
    for i in range(batch):
        prompt_mask[i, : int(torch.randint(0, prompt // 4 + 1, (1,), generator=g))] = 0
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "num_items_in_batch": completion_mask.sum(),
    }


def trainers(student, teacher, tok, ratio: float, out: Path):
    from datasets import Dataset
    from trl import DistillationTrainer

    from taopd.integrations.trl import (
        TeachabilityDistillationConfig,
        TeachabilityDistillationTrainer,
    )

    def args(**kw):
        return TeachabilityDistillationConfig(
            output_dir=str(out), use_cpu=not torch.cuda.is_available(), bf16=False,
            gradient_checkpointing=False, report_to=[], beta=1.0, selection_ratio=ratio,
            per_device_train_batch_size=1, **kw,
        )  # fmt: skip

    ds = Dataset.from_dict({"prompt": ["x"]})
    common = dict(model=student, teacher_model=teacher, train_dataset=ds, processing_class=tok)
    return {
        "vanilla": DistillationTrainer(args=args(), **common),
        "taopd": TeachabilityDistillationTrainer(args=args(), **common),
        "nocache": TeachabilityDistillationTrainer(
            args=args(selection_cache_teacher=False), **common
        ),
    }


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def step(trainer, arm: str, batch: dict) -> dict[str, float]:
    model = trainer.model
    model.zero_grad(set_to_none=True)
    parts: dict[str, float] = {}
    t0 = time.perf_counter()
    if arm != "vanilla":
        holder = {}
        parts["scoring"] = timed(lambda: holder.update(out=trainer._taopd_select(dict(batch))))
        batch = holder["out"]
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    parts["step"] = time.perf_counter() - t0
    parts["kept"] = float(batch["tool_mask"].sum()) if "tool_mask" in batch else float("nan")
    return parts


def scoring_parts(trainer, batch: dict) -> dict[str, float]:
    """Time the scoring pass's pieces once: student body, teacher body, signals, selection."""
    from taopd.core.scores import signals_from_hidden
    from taopd.core.selection import select_tokens
    from taopd.integrations.trl import head_spec

    student, teacher = trainer.model, trainer.teacher_model
    box: dict = {}
    with torch.no_grad():
        out = {
            "student body (no grad)": timed(
                lambda: box.update(s=trainer._taopd_hidden(student, student, batch))
            ),
            "teacher body": timed(
                lambda: box.update(t=trainer._taopd_hidden(teacher, teacher, batch))
            ),
        }
        valid = batch["completion_mask"].bool()
        out["signals_from_hidden"] = timed(
            lambda: box.update(
                sig=signals_from_hidden(
                    box["s"],
                    student.lm_head.weight,
                    box["t"],
                    teacher.lm_head.weight,
                    k=trainer.args.selection_k,
                    valid=valid,
                    student_head=head_spec(student),
                    teacher_head=head_spec(teacher),
                )  # fmt: skip
            )
        )
        out["select_tokens"] = timed(
            lambda: select_tokens(box["sig"], valid, ratio=trainer.args.selection_ratio)
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--completion", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    student, teacher, tok, desc = build(a.shape)
    vocab = student.get_output_embeddings().weight.shape[0]
    batch = make_batch(vocab, a.batch, a.prompt, a.completion, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tr = trainers(student, teacher, tok, a.ratio, Path(tmp))
        for t in tr.values():
            t.model.train()
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        kept = {}
        for r in range(a.warmup + a.repeats):
            order = ARMS[r % 3 :] + ARMS[: r % 3]
            for arm in order:
                res = step(tr[arm], arm, batch)
                kept[arm] = res["kept"]
                if r >= a.warmup:
                    times[arm].append(res["step"])
        parts = scoring_parts(tr["taopd"], batch)
    med = {arm: statistics.median(v) for arm, v in times.items()}
    valid = int(batch["completion_mask"].sum())
    print(f"## TRL step: {a.shape} — {desc}")
    print(
        f"batch {a.batch} × ({a.prompt} prompt + {a.completion} completion positions), "
        f"{valid} valid completion positions, ratio {a.ratio} "
        f"(kept {int(kept['taopd'])}), torch {torch.__version__}, {a.threads} threads, "
        f"{platform.processor() or platform.machine()}, {a.repeats} repeats (median)\n"
    )
    low = {arm: min(v) for arm, v in times.items()}
    print("| arm | step s (median) | × vanilla TRL | step s (min) | × vanilla TRL (min) |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        print(
            f"| {arm} | {med[arm]:.3f} | {med[arm] / med['vanilla']:.2f} | {low[arm]:.3f} | "
            f"{low[arm] / low['vanilla']:.2f} |"
        )
    print("\nScoring pass, once (s):\n")
    print("| part | s | × vanilla step |")
    print("|---|---|---|")
    for name, s in parts.items():
        print(f"| {name} | {s:.3f} | {s / med['vanilla']:.2f} |")
    if a.json is not None:
        a.json.write_text(
            json.dumps(
                {
                    "shape": a.shape,
                    "median_s": med,
                    "ratio": {k: v / med["vanilla"] for k, v in med.items()},
                    "times": times,
                    "scoring_parts_s": parts,
                    "kept": kept["taopd"],
                    "valid": valid,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

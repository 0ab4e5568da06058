#!/usr/bin/env python
"""taopd's embedded demo, trained by TRL: TA-OPD through `taopd.integrations.trl` on CPU, offline.

The same pair, task and settings as `taopd demo` (configs/demo.yaml): SmolLM2-135M-Instruct
fine-tuned on chain_sum (the cached teacher) distilled into the untuned model, teachability
top-20% of the response positions of each batch of 16, reverse KL (TRL's beta=1), AdamW lr 5e-5,
betas (0.9, 0.98), grad clip 1, at most 6 new tokens at temperature 1. Rollouts, the optimizer
and the loss are TRL's; the kept positions are taopd's. Prints accuracy before and after on
the 200 held-out problems (greedy, taopd's evaluation) like `taopd demo`.

    python examples/trl_demo.py                       # 30 steps, as the demo
    python examples/trl_demo.py --steps 10 --threads 1 --out runs/trl-demo
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="TRL steps (default: the demo's 30)")
    p.add_argument("--ratio", type=float, default=None, help="selection ratio (default 0.2)")
    p.add_argument("--strategy", default=None, help="taopd strategy (default teachability)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/trl-demo"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from datasets import Dataset

    from taopd.config import load_config
    from taopd.data import make_task, render_prompt
    from taopd.integrations.trl import (
        TeachabilityDistillationConfig,
        TeachabilityDistillationTrainer,
    )
    from taopd.models import load_model, load_tokenizer
    from taopd.training.evaluate import evaluate
    from taopd.training.sft import prepare_teacher

    cfg = load_config("demo", [])
    steps = a.steps or cfg.train.steps
    ratio = a.ratio if a.ratio is not None else cfg.selection.ratio
    strategy = a.strategy or cfg.selection.strategy
    start = time.perf_counter()
    teacher_dir = prepare_teacher(cfg)  # cached by content hash, shared with `taopd demo`
    tok = load_tokenizer(cfg.student)
    tok.padding_side = "left"
    student_name = cfg.student
    if getattr(cfg, "student_sft", None) is not None:  # a warm-started student, as taopd does
        from taopd.training.sft import prepare_student

        student_name = str(prepare_student(cfg))
    student = load_model(student_name)
    teacher = load_model(str(teacher_dir))
    task = make_task({**cfg.task.as_task_dict(), "suffix": cfg.task.prompt_suffix or None})
    train = task.examples("train", cfg.task.n_train, seed=cfg.task.seed)
    test = task.examples("test", cfg.task.n_test, seed=cfg.task.seed)

    def accuracy(model) -> float:
        res = evaluate(
            model, tok, task, test, batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens, system_prompt=cfg.task.system_prompt,
            progress=False, chat_template=cfg.task.chat_template,
        )  # fmt: skip
        return res["accuracy"]

    teacher_acc, before = accuracy(teacher), accuracy(student)
    print(f"teacher {teacher_acc:.1%}, student before {before:.1%}", flush=True)
    prompts = [
        render_prompt(tok, ex.question, cfg.task.system_prompt, cfg.task.chat_template)
        for ex in train
    ]
    args = TeachabilityDistillationConfig(
        output_dir=str(a.out), max_steps=steps, per_device_train_batch_size=cfg.train.batch_size,
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1],
        max_grad_norm=cfg.optim.grad_clip, lr_scheduler_type="constant", warmup_steps=0,
        max_completion_length=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
        beta=1.0, bf16=False, gradient_checkpointing=False, use_cpu=True, seed=cfg.train.seed,
        report_to=[], logging_steps=1, save_strategy="no", shuffle_dataset=True,
        selection_strategy=strategy, selection_ratio=ratio, selection_k=cfg.selection.k,
    )  # fmt: skip
    trainer = TeachabilityDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
    )
    train_start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_start
    student.eval()
    after = accuracy(student)
    logs = [h for h in trainer.state.log_history if "taopd/kept_positions" in h]
    kept = sum(h["taopd/kept_positions"] for h in logs)
    summary = {
        "teacher_accuracy": teacher_acc,
        "student_before": before,
        "student_after": after,
        "steps": steps,
        "strategy": strategy,
        "ratio": ratio,
        "tokens_trained_on": kept,
        "train_seconds": train_s,
        "total_seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (a.out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    print(
        f"TRL + taopd ({strategy} {ratio:g}, {steps} steps): teacher {teacher_acc:.1%}, "
        f"student {before:.1%} -> {after:.1%}, {int(kept)} tokens trained on, "
        f"{train_s / 60:.1f} min training ({summary['total_seconds'] / 60:.1f} min in all)"
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Rollout sampling speed: tokens/s of `taopd.training.rollout.generate` (HF generate) on SmolLM2.

Settings: batch 1 / 8 / 32, KV cache on (`use_cache=True`, HF's dynamic cache, what taopd uses)
or off (`use_cache=False`: every new token re-runs the whole prefix), greedy or sampled
(temperature 1, top_p 1). Settings run round-robin over the repeats; the table has the median.

tokens/s counts generated positions, batch x new tokens / wall seconds. By default eos is
suppressed (min_new_tokens = max_new_tokens) so every setting generates the same number of
tokens; --stop-at-eos measures real rollouts instead (and counts only tokens up to eos).

Correctness, checked once per setting outside the timing, on real rollouts (rows stop at eos: a
suppressed eos would make the sampler's logits differ from the model's on purpose):
  * greedy: the sampled tokens equal the argmax of the logits the trainer recomputes from the
    rollout (`hidden_states(model, ...) @ lm_head.T` at the response positions, left padding
    and all), i.e. the trainer scores exactly what the sampler saw;
  * cache off vs on: identical tokens for the same seed (greedy and sampled).

Usage:
  python benchmarks/generation.py                         # SmolLM2-135M, 3 batches x 2 x 2
  python benchmarks/generation.py --batches 1,8 --max-new-tokens 8 --repeats 1 --threads 2
  python benchmarks/generation.py --layers 6              # the cut 6-layer student
  python benchmarks/generation.py --caches dynamic,none,static --json gen.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from taopd.models import hidden_states, lm_head, load_model, load_tokenizer  # noqa: E402
from taopd.training.rollout import generate  # noqa: E402

QUESTIONS = [
    "What is 12 + 7?", "Compute 45 - 19.", "What is 3 + 88? Answer with only the number.",
    "Add 61 and 24.", "What is 9 - 14?", "State the final answer: 70 + 5 =",
    "What is the sum of 33 and 41?", "Subtract 8 from 52.",
]  # fmt: skip

CACHES = {
    "dynamic": {"use_cache": True},  # HF default: DynamicCache (what taopd's rollout uses)
    "none": {"use_cache": False},  # recompute the whole prefix for every new token
    "static": {"use_cache": True, "cache_implementation": "static"},
}


def prompts_for(tokenizer: Any, n: int) -> list[str]:
    """n chat-rendered prompts of different lengths (so batches are left-padded)."""
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)] + (" Think step by step." if i % 3 == 1 else "")
        out.append(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
        )
    return out


def run_one(model, tok, prompts, args, cache: str, greedy: bool, seed: int = 0):
    kw = dict(CACHES[cache])
    if not args.stop_at_eos:
        kw["min_new_tokens"] = args.max_new_tokens
    t = time.perf_counter()
    roll = generate(model, tok, prompts, args.max_new_tokens, greedy=greedy, seed=seed, **kw)
    dt = time.perf_counter() - t
    resp = roll.response_ids
    n_tokens = int(roll.response_mask.sum()) if args.stop_at_eos else resp.shape[0] * resp.shape[1]
    return roll, dt, n_tokens


@torch.no_grad()
def greedy_matches_trainer(model, roll) -> float:
    """Share of valid response positions where the greedy token is the argmax of the logits the
    trainer recomputes (hidden_states on the rollout, then lm_head)."""
    h = hidden_states(model, roll.input_ids, roll.attention_mask)
    p = roll.prompt_len
    logits = h[:, p - 1 : -1] @ lm_head(model).T
    valid = roll.response_mask[:, p:]
    agree = (logits.argmax(-1) == roll.input_ids[:, p:]) & valid
    return float(agree.sum() / valid.sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2", help="taopd model name (default: smollm2)")
    p.add_argument("--layers", type=int, default=None, help="cut the model to its first N layers")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--caches", default="dynamic,none", help=f"from {', '.join(CACHES)}")
    p.add_argument("--modes", default="greedy,sampled")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="let rows stop at eos (tokens/s then counts tokens up to eos)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed generate calls first")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",") if x.strip()]
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for c in caches:
        if c not in CACHES:
            p.error(f"unknown cache {c!r}; choose from {', '.join(CACHES)}")
    for m in modes:
        if m not in ("greedy", "sampled"):
            p.error(f"unknown mode {m!r}; choose greedy, sampled")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # generate() warns about config + kwargs per call
    model = load_model(args.model)
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[: args.layers]
    tok = load_tokenizer(args.model)
    settings = [(b, c, m) for b in batches for c in caches for m in modes]
    prompts = {b: prompts_for(tok, b) for b in batches}

    for _ in range(args.warmup):
        run_one(model, tok, prompts[batches[0]], args, caches[0], True)
    times: dict[tuple, list[float]] = {s: [] for s in settings}
    counts: dict[tuple, int] = {}
    for r in range(args.repeats):
        k = r % len(settings)
        for s in settings[k:] + settings[:k]:
            b, c, m = s
            _, dt, n = run_one(model, tok, prompts[b], args, c, m == "greedy", seed=r)
            times[s].append(dt)
            counts[s] = n
            print(
                f"  round {r + 1}/{args.repeats} batch {b:3d} cache {c:7s} {m:7s} "
                f"{n / dt:8.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )

    checks: dict[tuple, dict[str, Any]] = {}
    if not args.no_check:
        ref: dict[tuple, Any] = {}
        real = argparse.Namespace(**{**vars(args), "stop_at_eos": True})
        for s in settings:
            b, c, m = s
            roll, _, _ = run_one(model, tok, prompts[b], real, c, m == "greedy", seed=123)
            ref[s] = roll
            chk: dict[str, Any] = {}
            if m == "greedy":
                chk["greedy_matches_trainer_logits"] = greedy_matches_trainer(model, roll)
            checks[s] = chk
        for s in settings:
            b, c, m = s
            base = (b, caches[0], m)
            if c != caches[0] and base in ref:
                same = torch.equal(ref[s].input_ids, ref[base].input_ids)
                checks[s][f"same_tokens_as_{caches[0]}_cache"] = same

    rows = []
    for s in settings:
        b, c, m = s
        med = statistics.median(times[s])
        rows.append(
            {
                "batch": b,
                "cache": c,
                "mode": m,
                "seconds": times[s],
                "median_seconds": med,
                "tokens": counts[s],
                "tokens_per_second": counts[s] / med,
                "checks": checks.get(s, {}),
            }
        )
    n_params = sum(x.numel() for x in model.parameters())
    title = (
        f"# Rollout sampling, {args.model}"
        + (f" cut to {args.layers} layers" if args.layers else "")
        + f" ({n_params / 1e6:.1f} M params), {args.max_new_tokens} new tokens"
        + (" (stop at eos)" if args.stop_at_eos else " (eos suppressed)")
        + f", torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    lines = [
        title,
        "",
        "| batch | KV cache | mode | tok/s | s per call | check |",
        "|---:|---|---|---:|---:|---|",
    ]
    for row in rows:
        chk = (
            ", ".join(
                f"{k}={v:.1%}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row["checks"].items()
            )
            or "-"
        )
        lines.append(
            f"| {row['batch']} | {row['cache']} | {row['mode']} "
            f"| {row['tokens_per_second']:.1f} | {row['median_seconds']:.2f} | {chk} |"
        )
    best = {}
    for b in batches:
        for m in modes:
            cand = [r for r in rows if r["batch"] == b and r["mode"] == m]
            fastest = max(cand, key=lambda r: r["tokens_per_second"])
            best[f"{b}/{m}"] = fastest["cache"]
    lines += [
        "",
        "Fastest KV-cache setting per batch/mode: "
        + ", ".join(f"{k}: {v}" for k, v in best.items()),
        "",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "layers": args.layers,
                    "params": n_params,
                    "max_new_tokens": args.max_new_tokens,
                    "stop_at_eos": args.stop_at_eos,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "rows": rows,
                    "fastest": best,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""GPU check of the vLLM rollout backend against HF generate, on the bundled SmolLM2 student.

One run, in one process, on one CUDA GPU (engine colocated with the HF model, as in training):
  1. greedy agreement: `VLLMSampler` vs `taopd.training.rollout.generate`, greedy, on N
     chain_sum prompts of the demo recipe; a row agrees when its kept response tokens are
     identical. The prompt blocks must be identical (both backends use taopd's tokenization);
  2. weight sync: noise is added to every student parameter (as a training step would change
     them), then greedy agreement again; the share of rows the change altered shows it mattered;
  3. speed: tokens/s of both backends at temperature 1 on a batch of prompts (kept response
     tokens, i.e. up to and including eos, over wall seconds; the vLLM call includes its weight
     sync, as the trainer pays it), runs alternating, median reported;
  4. weight-sync seconds (load_weights + prefix-cache reset), median of 5.

Prints Markdown tables. Exit status 1 if a greedy agreement is below --min-agreement (default
0.95), 2 if there is no CUDA GPU or no vllm. Usage (after `pip install 'taopd[vllm]'`):
  python benchmarks/vllm_check.py
  python benchmarks/vllm_check.py --n-greedy 64 --n-speed 128 --repeats 2 --enforce-eager
  python benchmarks/vllm_check.py --json vllm_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from taopd.config import VLLMCfg, load_config  # noqa: E402
from taopd.data import make_task, render_prompt  # noqa: E402
from taopd.models import load_model, load_tokenizer  # noqa: E402
from taopd.training.rollout import Rollout, generate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="student (taopd name, folder or hub id)")
    ap.add_argument("--n-greedy", type=int, default=128, help="prompts of the greedy checks")
    ap.add_argument("--n-speed", type=int, default=256, help="batch of the speed runs")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per backend")
    ap.add_argument("--dtype", default="float32", help="student dtype (the engine follows it)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs in vLLM")
    ap.add_argument("--noise", type=float, default=0.05, help="weight change, x each std")
    ap.add_argument("--min-agreement", type=float, default=0.95)
    ap.add_argument("--show", type=int, default=5, help="mismatching rows printed")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    return ap.parse_args(argv)


def chain_sum_prompts(tok: Any, n: int) -> list[str]:
    """`n` rendered prompts of the demo recipe's chain_sum task (train split)."""
    cfg = load_config("demo")
    task = make_task({**cfg.task.as_task_dict(), "suffix": cfg.task.prompt_suffix or None})
    examples = task.examples("train", n, seed=cfg.task.seed)
    return [
        render_prompt(tok, ex.question, cfg.task.system_prompt, cfg.task.chat_template)
        for ex in examples
    ]


def kept(roll: Rollout, i: int) -> list[int]:
    """Row i's response tokens up to and including eos."""
    p = roll.prompt_len
    return roll.input_ids[i, p:][roll.response_mask[i, p:]].tolist()


def compare(hf: Rollout, vl: Rollout, show: int, label: str) -> dict[str, Any]:
    """Rows with identical kept responses; prints the first `show` mismatches."""
    assert hf.prompt_len == vl.prompt_len, "prompt blocks differ in width"
    p = hf.prompt_len
    same_prompts = torch.equal(hf.input_ids[:, :p].cpu(), vl.input_ids[:, :p].cpu())
    n, agree, shown = len(hf), 0, 0
    for i in range(n):
        a, b = kept(hf, i), kept(vl, i)
        if a == b:
            agree += 1
            continue
        if shown < show:
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(
                f"[{label}] row {i}: first difference at response token {first}\n"
                f"  hf:   {hf.texts[i]!r}\n  vllm: {vl.texts[i]!r}"
            )
            shown += 1
    return {"rows": n, "agree": agree, "share": agree / n, "same_prompts": same_prompts}


def timed(fn: Any) -> tuple[Any, float]:
    """(result, wall seconds) with the GPU synchronized around the call."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("vllm_check: needs a CUDA GPU (none visible)", file=sys.stderr)
        return 2
    try:
        import vllm
    except ImportError:
        print("vllm_check: needs vllm: pip install 'taopd[vllm]'", file=sys.stderr)
        return 2
    import transformers

    from taopd.training.vllm_sampler import VLLMSampler

    gpu = torch.cuda.get_device_name(0)
    print(
        f"GPU {gpu}; torch {torch.__version__}, vllm {vllm.__version__}, "
        f"transformers {transformers.__version__}; student {args.model} ({args.dtype})\n"
    )
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device="cuda")
    prompts = chain_sum_prompts(tok, max(args.n_greedy, args.n_speed))
    greedy_prompts, speed_prompts = prompts[: args.n_greedy], prompts[: args.n_speed]
    cfg = VLLMCfg(
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager
    )
    sampler = VLLMSampler(args.model, cfg)
    mnt = args.max_new_tokens

    # 1. greedy agreement (the first vLLM call builds the engine: timed apart)
    _, first_call_s = timed(lambda: sampler(model, tok, greedy_prompts[:2], mnt, greedy=True))
    hf_g = generate(model, tok, greedy_prompts, mnt, greedy=True)
    vl_g = sampler(model, tok, greedy_prompts, mnt, greedy=True)
    before = compare(hf_g, vl_g, args.show, "greedy")

    # 3./4. speed at temperature 1 and weight-sync seconds, on the original weights
    hf_s: list[float] = []
    vl_s: list[float] = []
    for r in range(args.repeats + 1):  # round 0 warms both up, untimed
        order = ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")
        for which in order:
            if which == "hf":
                roll, dt = timed(lambda r=r: generate(model, tok, speed_prompts, mnt, seed=r))
                rate = hf_s
            else:
                roll, dt = timed(lambda r=r: sampler(model, tok, speed_prompts, mnt, seed=r))
                rate = vl_s
            if r > 0:
                rate.append(int(roll.response_mask.sum()) / dt)
    syncs = []
    for _ in range(5):
        sampler.sync_weights(model)
        syncs.append(sampler.last_sync_s)

    # 2. a weight change, then greedy agreement again
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            p.add_(noise * (args.noise * p.float().std()).to(p.dtype))
    hf_g2 = generate(model, tok, greedy_prompts, mnt, greedy=True)
    vl_g2 = sampler(model, tok, greedy_prompts, mnt, greedy=True)
    after = compare(hf_g2, vl_g2, args.show, "after weight change")
    changed = sum(kept(hf_g, i) != kept(hf_g2, i) for i in range(len(hf_g))) / len(hf_g)

    n_params = sum(p.numel() for p in model.parameters())
    hf_rate, vl_rate = statistics.median(hf_s), statistics.median(vl_s)
    sync_s = statistics.median(syncs)
    print(f"\n## vLLM backend vs HF generate ({gpu}, {args.model}, {args.dtype})\n")
    print("| check | result |")
    print("|---|---|")
    for label, res in (("greedy rows identical", before), ("after a weight change", after)):
        ok = "yes" if res["same_prompts"] else "NO"
        print(
            f"| {label} ({res['rows']} chain_sum prompts, {mnt} new tokens) | "
            f"{res['agree']}/{res['rows']} ({res['share']:.1%}); prompt blocks identical: {ok} |"
        )
    print(f"| rows the weight change altered (HF greedy) | {changed:.1%} |")
    print(f"\n| backend | sampled tok/s (batch {args.n_speed}, T=1, median of {args.repeats}) |")
    print("|---|---:|")
    print(f"| HF generate | {hf_rate:,.0f} |")
    print(f"| vLLM (incl. weight sync) | {vl_rate:,.0f} |")
    print(f"| vLLM / HF | {vl_rate / hf_rate:.2f}x |")
    print("\n| engine | seconds |\n|---|---:|")
    print(f"| engine start | {sampler.engine_start_s:.1f} |")
    print(f"| first call (start + first sync + 2 prompts) | {first_call_s:.1f} |")
    print(f"| weight sync ({n_params / 1e6:.0f} M params, median of 5) | {sync_s:.3f} |")

    ok = before["share"] >= args.min_agreement and after["share"] >= args.min_agreement
    ok = ok and before["same_prompts"] and after["same_prompts"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "gpu": gpu,
                    "torch": torch.__version__,
                    "vllm": vllm.__version__,
                    "model": args.model,
                    "dtype": args.dtype,
                    "max_new_tokens": mnt,
                    "greedy": before,
                    "greedy_after_change": after,
                    "changed_by_weight_change": changed,
                    "hf_tok_s": hf_s,
                    "vllm_tok_s": vl_s,
                    "sync_s": syncs,
                    "engine_start_s": sampler.engine_start_s,
                    "first_call_s": first_call_s,
                    "passed": ok,
                },
                f,
                indent=2,
            )
    verdict = "PASSED" if ok else "FAILED"
    print(f"\n{verdict}: greedy agreement must be >= {args.min_agreement:.0%} before and after")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

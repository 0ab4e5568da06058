"""Per-rank memory of the student's training state: replicated vs FSDP2-sharded (taopd.sharding).

Spawns N CPU processes (gloo), builds the same randomly initialized Llama in each, takes one
AdamW step on a trivial loss, and counts the bytes each rank keeps between steps: weights,
gradients and optimizer state, as the trainer leaves them (replicated: whole on every rank;
sharded: this rank's shards, after the step's gathered weights were released). Prints a table.

    python benchmarks/sharding.py                     # SmolLM2-135M shape, 2 processes
    python benchmarks/sharding.py --shape tiny        # seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {
    # SmolLM2-135M-Instruct's dimensions (random weights: memory does not depend on values)
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = _local(t)
        if t.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _worker(rank: int, world: int, shape: str, port: int, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from transformers import LlamaConfig, LlamaForCausalLM

    from taopd.sharding import gather, release, shard_student

    results = {}
    for layout in ("replicated", "sharded"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
        units = shard_student(model, torch.device("cpu")) if layout == "sharded" else []
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gather(units)
        ids = torch.randint(0, SHAPES[shape]["vocab_size"], (1, 16))
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        opt.step()
        release(units)
        params = list(model.parameters())
        results[layout] = {
            "weights": _bytes(params),
            "gradients": _bytes([p.grad for p in params if p.grad is not None]),
            "optimizer": _bytes([v for s in opt.state.values() for v in s.values() if v.dim()]),
        }
    queue.put((rank, results))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--port", type=int, default=29533)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, args.procs, args.shape, args.port, queue))
        for r in range(args.procs)
    ]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a worker failed (exit {p.exitcode})")
    rep, shd = got[0]["replicated"], got[0]["sharded"]
    print(f"shape {args.shape}, {args.procs} processes, fp32, AdamW; MiB on rank 0 between steps\n")
    print("| state | replicated | sharded (FSDP2) | ratio |")
    print("|---|---:|---:|---:|")
    for key in ("weights", "gradients", "optimizer"):
        print(
            f"| {key} | {rep[key] / 2**20:.1f} | {shd[key] / 2**20:.1f} | "
            f"{shd[key] / max(1, rep[key]):.2f} |"
        )
    tot_r, tot_s = sum(rep.values()), sum(shd.values())
    print(f"| total | {tot_r / 2**20:.1f} | {tot_s / 2**20:.1f} | {tot_s / tot_r:.2f} |")
    print(
        "\nDuring a step the sharded layout gathers the whole weights again (rollouts, scoring"
        " and the selective head read them directly)."
    )


if __name__ == "__main__":
    main()

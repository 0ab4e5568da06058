"""Per-rank memory of the student's training state: replicated vs FSDP2 vs DeepSpeed ZeRO-3.

Spawns N CPU processes (gloo), builds the same randomly initialized Llama in each, takes one
AdamW step on a trivial loss, and counts the bytes each rank keeps between steps: weights,
gradients and optimizer state, as the trainer leaves them (replicated: whole on every rank;
FSDP2 (taopd.training.engines.fsdp): this rank's shards, after the step's gathered weights were
released; ZeRO-3 (taopd.training.engines.zero, when deepspeed is installed): the weight partitions,
DeepSpeed's gradient partition buffer, and AdamW's moments plus the fp32 master partitions).
Prints a table.

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
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from transformers import LlamaConfig, LlamaForCausalLM

    from taopd.training.engines.fsdp import gather, release, shard_student

    results = {}
    try:
        import deepspeed  # noqa: F401

        layouts = ("replicated", "sharded", "zero3")
    except ImportError:
        layouts = ("replicated", "sharded")
    for layout in layouts:
        if layout == "zero3":
            results[layout] = _zero3_state(shape)
            continue
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


def _zero3_state(shape: str) -> dict[str, int]:
    """Bytes this rank keeps between steps under ZeRO-3 as taopd drives it (DeepSpeed 0.19)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from taopd.training.engines import zero

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine = zero.init_engine(
        model, opt, zero.deepspeed_config(dist.get_world_size(), 1.0, "float32")
    )
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (1, 16))
    with zero.whole(model):
        loss = engine(lambda m: m(input_ids=ids).logits.float().pow(2).mean())
        engine.backward(loss)
    engine.step()
    zopt = engine.optimizer
    moments = [v for st in opt.state.values() for v in st.values() if v.dim()]
    return {
        "weights": _bytes([p.ds_tensor for p in model.parameters()]),
        "gradients": _bytes([zopt.grad_partitions_flat_buffer]),
        "optimizer": _bytes(moments + list(zopt.fp32_partitioned_groups_flat)),
    }


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
    res = got[0]
    names = {"replicated": "replicated", "sharded": "FSDP2", "zero3": "ZeRO-3"}
    cols = [c for c in names if c in res]
    print(f"shape {args.shape}, {args.procs} processes, fp32, AdamW; MiB on rank 0 between steps\n")
    head = " | ".join(names[c] + ("" if c == "replicated" else " (ratio)") for c in cols)
    print(f"| state | {head} |")
    print("|---|" + "---:|" * len(cols))
    for key in ("weights", "gradients", "optimizer", "total"):

        def value(c: str, key: str = key) -> int:
            return sum(res[c].values()) if key == "total" else res[c][key]

        cells = [f"{value('replicated') / 2**20:.1f}"]
        cells += [
            f"{value(c) / 2**20:.1f} ({value(c) / max(1, value('replicated')):.2f})"
            for c in cols[1:]
        ]
        print(f"| {key} | " + " | ".join(cells) + " |")
    print(
        "\nDuring a step both sharded layouts gather the whole weights again (rollouts, scoring"
        " and the selective head read them directly). ZeRO-3's optimizer column includes its"
        " fp32 master partitions (a copy even in fp32 training)."
    )


if __name__ == "__main__":
    main()

"""Student engines (taopd.training.engines): each one's step equals the replicated step on
one process.

A tiny two-layer network takes one step on a fixed batch: the replicated engine in process (and
its clipping, non-finite skip and resume), FSDP2 and DeepSpeed ZeRO-3 on two gloo processes,
each holding half of the rows. Every engine must end on the one-process weights, and resuming
from its `full_state` must continue exactly like the engine that wrote it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from taopd.config import load_config
from taopd.errors import UserError
from taopd.training.collectives import Group, leave_process_group
from taopd.training.engines import ENGINES, make_engine
from taopd.training.engines.zero import check_resumable

ROWS, WIDTH = 8, 6


class TinyNet(nn.Module):
    """Two layers in a ModuleList (FSDP's units) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(2)])
        self.head = nn.Linear(WIDTH, 4)  # even sizes: DeepSpeed 0.19 cannot set odd partitions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def _batch(step: int) -> torch.Tensor:
    return torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(100 + step))


def _cfg(*overrides: str):
    return load_config(None, ["optim.lr=0.1", "optim.weight_decay=0.01", *overrides])


class _Acc(SimpleNamespace):
    """The slice of accelerate's Accelerator that `Group` uses, over torch.distributed."""

    def __init__(self, rank: int, world: int) -> None:
        super().__init__(
            process_index=rank,
            num_processes=world,
            device=torch.device("cpu"),
            is_main_process=rank == 0,
        )

    def wait_for_everyone(self) -> None:
        if self.num_processes > 1:
            torch.distributed.barrier()

    def reduce(self, t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.num_processes)]
        torch.distributed.all_gather(parts, t)
        return torch.cat(parts)


def _one_step(engine, step: int, rank: int, world: int, cfg, poison: bool = False):
    """Loss = mean over the global batch of the squared outputs; this rank's rows only."""
    rows = _batch(step)[rank * ROWS // world : (rank + 1) * ROWS // world]
    with engine.whole():
        out = engine.forward(lambda m: m(rows))
        loss = (out**2).sum() / ROWS
        if poison:
            loss = loss * float("nan")
        engine.backward(loss, last=True)
    return engine.step(float(loss.detach()), cfg.optim.grad_clip)


def _state(engine) -> dict[str, torch.Tensor]:
    weights, _ = engine.full_state()
    model_state = weights if weights is not None else engine.student.state_dict()
    return {k: v.detach().cpu().clone() for k, v in model_state.items()}


def _reference(steps: int, cfg) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The replicated engine on one process, whole batches."""
    engine = make_engine("replicated", _net(), Group(_Acc(0, 1)), cfg, None)
    norms = [_one_step(engine, s, 0, 1, cfg)[0] for s in range(steps)]
    return _state(engine), norms


def _save_ckpt(folder: Path, weights: dict[str, torch.Tensor]) -> Path:
    (folder / "model").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model" / "w.safetensors")
    return folder


# ----------------------------------------------------------------------------------- replicated


def test_engine_names():
    assert ENGINES == ("replicated", "fsdp", "deepspeed")
    with pytest.raises(ValueError, match="engine must be one of"):
        make_engine("ddp", _net(), Group(_Acc(0, 1)), _cfg(), None)


def test_replicated_step_is_clipped_adamw():
    cfg = _cfg("optim.grad_clip=0.05")
    engine = make_engine("replicated", _net(), Group(_Acc(0, 1)), cfg, None)
    norm, applied = _one_step(engine, 0, 0, 1, cfg)
    model = _net()  # by hand: the same loss, clip to 0.05, AdamW
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01, betas=(0.9, 0.98))
    ((model(_batch(0)) ** 2).sum() / ROWS).backward()
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    opt.step()
    assert applied and norm == pytest.approx(float(want)) and norm > 0.05
    for (name, a), b in zip(engine.student.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert all(p.grad is None for p in engine.student.parameters())


def test_replicated_skips_a_non_finite_step():
    cfg = _cfg()
    engine = make_engine("replicated", _net(), Group(_Acc(0, 1)), cfg, None)
    before = _state(engine)
    _, applied = _one_step(engine, 0, 0, 1, cfg, poison=True)
    assert not applied
    after = _state(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in engine.student.parameters())  # zeroed for the next step


def test_replicated_resume_continues_exactly(tmp_path):
    cfg = _cfg()
    want, _ = _reference(2, cfg)
    first = make_engine("replicated", _net(), Group(_Acc(0, 1)), cfg, None)
    _one_step(first, 0, 0, 1, cfg)
    weights, opt_state = first.full_state()
    assert weights is None  # the model's own state dict is saved
    ckpt = _save_ckpt(tmp_path / "ckpt", first.student.state_dict())
    second = make_engine("replicated", _net(), Group(_Acc(0, 1)), cfg, None)
    second.load_state(ckpt, opt_state, lora=False)
    _one_step(second, 1, 0, 1, cfg)
    got = _state(second)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


# ----------------------------------------------------------------------------- sharded, 2 ranks


def _worker(rank: int, world: int, kind: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    cfg = _cfg()
    group = Group(_Acc(rank, world))
    engine = make_engine(kind, _net(), group, cfg, None)
    norm, applied = _one_step(engine, 0, rank, world, cfg)
    weights, opt_state = engine.full_state()
    one_step = {k: v.detach().cpu().clone() for k, v in (weights or {}).items()}
    # resume: the whole weights and optimizer state into a fresh engine, then step 2 on both
    ckpt = Path(out).with_suffix(".ckpt")
    if rank == 0:  # as the trainer writes it: whole weights, optimizer state in a file
        _save_ckpt(ckpt, one_step)
        torch.save(opt_state, ckpt / "optimizer.pt")
    group.wait()
    resumed = make_engine(kind, _net(), group, cfg, ckpt)
    resumed.load_state(ckpt, torch.load(ckpt / "optimizer.pt", weights_only=False), lora=False)
    for e in (engine, resumed):
        _one_step(e, 1, rank, world, cfg)
    two_steps, resumed_two = _state(engine), _state(resumed)
    if rank == 0:
        result = {"norm": norm, "applied": applied, "one": one_step, "two": two_steps}
        torch.save({**result, "resumed": resumed_two}, out)
    # as `taopd train` ends: DeepSpeed's gloo threads would race the interpreter's shutdown
    # (the SIGABRT this test once met); an error above still reaches spawn as a traceback
    leave_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["fsdp", "deepspeed"])
def test_sharded_engine_equals_one_process(kind, tmp_path):
    """Two ranks with half of the rows each: one step, then a resumed step, as one process."""
    if kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    out = tmp_path / "result.pt"
    torch.multiprocessing.spawn(
        _worker, args=(2, kind, _free_port(), str(out)), nprocs=2, join=True
    )
    got = torch.load(out, weights_only=False)
    cfg = _cfg()
    one, norms = _reference(1, cfg)
    two, _ = _reference(2, cfg)
    assert got["applied"] and math.isclose(got["norm"], norms[0], rel_tol=1e-5)
    for k in one:
        torch.testing.assert_close(got["one"][k], one[k], msg=k)
        torch.testing.assert_close(got["two"][k], two[k], msg=k)
        torch.testing.assert_close(got["resumed"][k], got["two"][k], msg=k)


def test_deepspeed_resume_with_an_odd_sized_parameter_is_refused_before_any_work(tmp_path):
    """DeepSpeed 0.19 cannot set an odd partition: refused with the parameter and the count,
    before DeepSpeed (or the process group) is touched and before the weights are loaded."""
    net = _net()
    net.head = nn.Linear(WIDTH, 5)  # head.bias: 5 elements, not divisible by 2 processes
    ckpt = tmp_path / "ckpt"  # no weights in it: loading them would fail differently
    with pytest.raises(UserError, match=r"on 2 processes: parameter head\.bias has 5 elements"):
        make_engine("deepspeed", net, Group(_Acc(0, 2)), _cfg(), ckpt)
    assert not ckpt.exists()
    check_resumable(_net(), 2)  # even sizes pass
    with pytest.raises(UserError, match="layers.0.weight has 36 elements, not divisible by 5"):
        check_resumable(_net(), 5)

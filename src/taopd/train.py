"""The selective OPD loop: rollouts, teacher scoring, selection, selective-head loss, on accelerate.

One step (../shared/design.md): the student samples responses; teacher and student bodies give
hidden states; signals are scored from detached hidden states in chunks; the strategy keeps a
share of the batch's response positions; only those rows go through the student's lm_head with
gradient. Multi-process runs select over the global batch and normalize by the global count,
with the student replicated or sharded (FSDP2, sharding.py; DeepSpeed ZeRO, zero.py). The teacher
runs in process or
behind a server that returns its top-k log-probs (teacher_server.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import zero
from .checkpoint import (
    atomic_write_text,
    check_checkpoint_student,
    latest_checkpoint,
    load_rollout,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    save_rollout,
    set_rng_state,
)
from .config import Config
from .data import Example, make_task, render_prompt
from .errors import UserError
from .evaluate import evaluate, is_correct
from .loss import selective_head_loss
from .models import (
    check_context,
    check_tokenizers,
    lm_head,
    load_model,
    load_tokenizer,
    resolve_model,
    shared_vocab_size,
)
from .rollout import Rollout, make_sampler, response_hidden, tokenize_left
from .run_dir import check_output, claim, out_of_memory
from .scores import (
    TokenSignals,
    signals_from_hidden,
    signals_from_teacher_topk,
    teachability_of,
)
from .selection import select_tokens
from .sharding import (
    full_model_state,
    full_optimizer_state,
    gather,
    release,
    set_full_optimizer_state,
    shard_student,
)
from .teacher_server import TeacherServer

__all__ = ["Trainer", "TrainingError", "train", "token_samples"]

SIGNAL_NAMES = ("teachability", "student_entropy", "disagreement", "compatibility", "reverse_kl")


class StepPass(NamedTuple):
    """What a step's forward and backward passes leave for its metrics and samples."""

    roll: Rollout
    sig: TokenSignals
    mask: Tensor
    h_s: Tensor
    h_t: Tensor | None
    served: (
        tuple[Tensor, Tensor, Tensor] | None
    )  # a served teacher's top ids, log-probs, log p_T(y)
    loss: float
    rollout_seconds: float
    scoring_seconds: float


class TrainingError(UserError):
    """A run that cannot go on (e.g. repeated non-finite losses); its last checkpoint is kept."""


def _scheduler(opt: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    total, warm, kind = cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.scheduler

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - frac if kind == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _mean(x: Tensor, m: Tensor) -> float:
    return float(x[m].mean()) if bool(m.any()) else float("nan")


def kl_concentration(kl: Tensor, valid: Tensor, solved: float = 0.05) -> dict[str, float]:
    """How a batch's reverse KL is spread (the CoT pilot gate): the share of valid positions
    already solved (KL < `solved` nats) and the share of the total KL held by the top 5%."""
    x = kl[valid].double()
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return {"solved_share": float("nan"), "kl_top5_share": float("nan")}
    n = math.ceil(0.05 * x.numel())
    total = float(x.clamp_min(0).sum())
    top = float(x.clamp_min(0).topk(n).values.sum())
    return {
        "solved_share": float((x < solved).double().mean()),
        "kl_top5_share": top / total if total > 0 else float("nan"),
    }


def _candidates(tokenizer: Any, ids: Tensor, probs: Tensor) -> list[list[list[Any]]]:
    """Per position, [[decoded token, probability], ...] of the given top ids."""
    return [
        [[tokenizer.decode([int(t)]), round(float(q), 4)] for t, q in zip(tr, prr)]
        for tr, prr in zip(ids, probs)
    ]


@torch.no_grad()
def token_samples(
    tokenizer: Any,
    roll: Rollout,
    sig: TokenSignals,
    mask: Tensor,
    h_s: Tensor,
    h_t: Tensor | None,
    w_s: Tensor,
    w_t: Tensor | None,
    vocab_size: int,
    step: int,
    rows: int = 2,
    top: int = 5,
    teach: Tensor | None = None,
    teacher_top: tuple[Tensor, Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Token-view records (report.py's samples.jsonl format) for the first `rows` rollouts.

    Per response token: the signals, whether it was selected, and the student's and teacher's
    top candidates (only these few rows are projected through the lm_heads). `teach` gives the
    teachability normalized over a larger batch; by default it is normalized over `roll`.
    `teacher_top` (ids, log-probs [B, T, R]) replaces h_t / w_t for a teacher served over HTTP.
    """
    p = roll.prompt_len
    valid = roll.response_mask[:, p:]
    if teach is None:
        teach = teachability_of(sig, valid)
    out = []
    for b in range(min(rows, valid.shape[0])):
        idx = valid[b].nonzero().squeeze(-1)
        ids = roll.input_ids[b, p:][idx].tolist()
        cands = {}
        sides = [("student_top", h_s, w_s)] + (
            [("teacher_top", h_t, w_t)] if h_t is not None else []
        )
        for side, h, w in sides:
            logits = h[b, idx].float() @ w[:vocab_size].float().T
            pr, ti = torch.softmax(logits, -1).topk(top, -1)
            cands[side] = _candidates(tokenizer, ti, pr)
        if teacher_top is not None:
            lp, order = teacher_top[1][b, idx].float().topk(top, -1)
            cands["teacher_top"] = _candidates(
                tokenizer, teacher_top[0][b, idx].gather(-1, order), lp.exp()
            )
        signals = {"teachability": teach[b, idx].tolist()}
        for name in ("student_entropy", "disagreement", "compatibility", "reverse_kl"):
            values = getattr(sig, name)[b, idx]
            if not bool(torch.isnan(values).all()):  # NaN: not available (served teacher)
                signals[name] = values.tolist()
        prompt_ids = roll.input_ids[b, :p][roll.attention_mask[b, :p].bool()]
        out.append(
            {
                "step": step,
                "prompt": tokenizer.decode(prompt_ids.tolist()),
                "answer": None,
                "correct": None,
                "tokens": [tokenizer.decode([t]) for t in ids],
                "selected": mask[b, idx].tolist(),
                "signals": signals,
                **cands,
            }
        )
    return out


class Trainer:
    """Selective OPD trainer; `run()` trains, evaluates, checkpoints and writes summary.json."""

    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        accelerator: Any | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        self.progress = progress
        env = os.environ  # accelerate launch's config (CPU runs report it as MULTI_CPU)
        kind = str(getattr(accelerator, "distributed_type", "")).upper()
        launched_ds = "DEEPSPEED" in kind or env.get("ACCELERATE_USE_DEEPSPEED") == "true"
        self.deepspeed = cfg.train.deepspeed or launched_ds
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        kind = str(getattr(self.acc, "distributed_type", "")).upper()
        self.fsdp = cfg.train.fsdp or "FSDP" in kind or env.get("ACCELERATE_USE_FSDP") == "true"
        for name, on in (("fsdp", self.fsdp), ("deepspeed", self.deepspeed)):
            if on and self.world == 1:
                raise UserError(
                    f"train.{name} shards across processes: launch 2 or more with accelerate"
                )
            if on and cfg.lora is not None:
                raise UserError(f"lora with {name} is not supported: use one or the other")
        if self.fsdp and self.deepspeed:
            raise UserError("train.fsdp and DeepSpeed both shard the student: choose one")
        self.engine: Any = None  # the DeepSpeed engine (train.deepspeed)
        self.units: list[Any] = []
        if cfg.train.batch_size % self.world:
            raise UserError(
                f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                f"{self.world} processes"
            )
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.server: TeacherServer | None = None
        if cfg.teacher_server is not None:  # fail fast, before the output folder is touched
            self.server = TeacherServer.from_config(cfg.teacher_server)
            self.server.connect()
        self.out = Path(cfg.output_dir)
        self.resume_from = self._prepare_output(resume, overwrite)
        self.stop_requested = False
        self._setup()

    # ----------------------------------------------------------------------------- set-up
    def _prepare_output(self, resume: bool, overwrite: bool) -> Path | None:
        """Check the output folder, writing nothing; return the checkpoint to resume."""
        ckpt, has_run = check_output(self.out, resume, overwrite)
        # Creating, locking and clearing the folder (--overwrite) and writing config.yaml wait
        # for _commit_output, after every input check: a run that fails one leaves it as it was.
        self._replace_run = overwrite and has_run
        self._fresh_start = ckpt is None
        return ckpt

    def _commit_output(self) -> None:
        """Claim the output folder: create and lock it, remove a run replaced by --overwrite,
        write the taopd marker and config.yaml."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            files = {"config.yaml": self.cfg.to_yaml()} if self._fresh_start else {}
            self._lock = claim(self.out, "train", self._replace_run, files)
        self.acc.wait_for_everyone()

    def _setup(self) -> None:
        cfg, acc = self.cfg, self.acc
        self.task = make_task({**cfg.task.as_task_dict(), "suffix": cfg.task.prompt_suffix or None})
        self.train_examples = self.task.examples("train", cfg.task.n_train, seed=cfg.task.seed)
        self.test_examples = self.task.examples("test", cfg.task.n_test, seed=cfg.task.seed)
        if not self.train_examples:
            raise UserError("the task gave no training examples")
        if cfg.train.batch_size > len(self.train_examples):
            raise UserError(
                f"train.batch_size={cfg.train.batch_size} exceeds the task's "
                f"{len(self.train_examples)} training examples; lower it or raise task.n_train"
            )
        teacher_name = cfg.teacher
        roles = [("student", cfg.student)]
        if self.server is None:  # a served teacher: `teacher` names only its tokenizer
            roles.append(("teacher", cfg.teacher))
        for role, name in roles:
            folder = Path(resolve_model(name))
            if folder.is_dir() and not (folder / "config.json").is_file():
                raise UserError(
                    f"{role} model folder {name} holds no saved model (no config.json); "
                    "give a folder written by save_pretrained, a hub id or 'smollm2'"
                )
        self.tokenizer = load_tokenizer(cfg.student)
        teacher_tok = load_tokenizer(cfg.teacher)
        check_tokenizers(self.tokenizer, teacher_tok, cfg.student, cfg.teacher)
        if cfg.selection.k > len(self.tokenizer):
            raise UserError(
                f"selection.k={cfg.selection.k} exceeds the vocabulary size {len(self.tokenizer)}"
            )
        if cfg.lora is not None:
            try:
                import peft  # noqa: F401
            except ImportError:
                raise UserError("lora: needs the peft extra: pip install 'taopd[peft]'") from None
        if cfg.teacher_sft is not None:
            from .sft import prepare_teacher

            with acc.main_process_first():
                teacher_name = str(prepare_teacher(cfg, progress=self.progress))
        student_name = cfg.student
        if cfg.student_sft is not None:  # warm start on the task's format (cached)
            from .sft import prepare_student

            with acc.main_process_first():
                student_name = str(prepare_student(cfg, progress=self.progress))
        self.teacher_path = teacher_name if self.server is None else repr(self.server)
        device = acc.device
        self.teacher: torch.nn.Module | None = None  # None: the teacher is self.server
        if self.server is None:
            t_dtype = cfg.train.teacher_dtype or cfg.train.dtype
            self.teacher = load_model(teacher_name, dtype=t_dtype, device=device).eval()
            self.teacher.requires_grad_(False)
        student = load_model(student_name, dtype=cfg.train.dtype, device=device)
        if cfg.lora is not None:
            student = self._apply_lora(student)
        self.student = student
        self.vocab_size = shared_vocab_size(self.tokenizer, self.student, self.teacher)
        check_context(
            {"student": student, "teacher": self.teacher}, self.tokenizer, self.render, cfg,
            [e.question for e in self.train_examples], [e.question for e in self.test_examples],
        )  # fmt: skip
        if self.resume_from is not None and cfg.lora is None:
            check_checkpoint_student(self.resume_from, student)
        self._commit_output()  # inputs look sound: only now touch the output folder
        if (self.fsdp or self.deepspeed) and self.resume_from is not None:
            self._load_weights(self.resume_from)  # whole weights go in before sharding
        if self.fsdp:  # the optimizer sees the shards
            self.units = shard_student(student, device)
        pd = cfg.selection.projection_dtype
        self.projection_dtype = None if pd == "auto" else getattr(torch, pd)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas
        )
        if self.deepspeed:  # partitions the student; `self.opt` then steps the partitions
            ds = zero.deepspeed_config(self.world, cfg.optim.grad_clip, cfg.train.dtype)
            self.engine = zero.init_engine(student, self.opt, ds)
        self.sched = _scheduler(self.opt, cfg)
        self.sampler = make_sampler(cfg)  # rollout.backend; vllm: student + rollout.vllm
        self.step = 0
        self.data_pos = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.tokens_trained = 0
        self.skipped_prompts = 0
        self.truncated_prompts = 0
        self.history: dict[str, Any] = {}
        self._bank: Rollout | None = None
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.tb = None
        if cfg.train.tensorboard and acc.is_main_process:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"))
            except ImportError:  # tensorboard not installed: JSONL only
                self.tb = None

    def _apply_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UserError("lora: needs the peft extra: pip install 'taopd[peft]'") from None
        lc = self.cfg.lora
        assert lc is not None
        return get_peft_model(
            model,
            LoraConfig(
                r=lc.r,
                lora_alpha=lc.alpha,
                lora_dropout=lc.dropout,
                target_modules=lc.target_modules,
                task_type="CAUSAL_LM",
            ),
        )

    # ----------------------------------------------------------------------------- data
    def _epoch_order(self, epoch: int) -> list[int]:
        """The seeded shuffle of the train split for `epoch` (recomputed only when it changes)."""
        cached = getattr(self, "_order", None)
        if cached is None or cached[0] != epoch:
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + epoch)
            self._order = (epoch, torch.randperm(len(self.train_examples), generator=gen).tolist())
        return self._order[1]

    def _next_examples(self) -> list[Example]:
        """This rank's share of the next global batch; the data position survives resume."""
        n_ex = len(self.train_examples)
        bs = self.cfg.train.batch_size
        picked = []
        for j in range(bs):
            pos = self.data_pos + j
            epoch, idx = divmod(pos, n_ex)
            picked.append(self.train_examples[self._epoch_order(epoch)[idx]])
        self.data_pos += bs
        per = bs // self.world
        return picked[self.rank * per : (self.rank + 1) * per]

    def render(self, question: str) -> str:
        cfg = self.cfg.task
        return render_prompt(self.tokenizer, question, cfg.system_prompt, cfg.chat_template)

    def _fit_prompts(self, prompts: list[str]) -> list[str]:
        """Apply rollout.max_prompt_tokens: keep the last tokens (truncate) or drop (skip).

        The skipped / truncated counts are summed over all ranks (every rank calls this)."""
        limit, mode = self.cfg.rollout.max_prompt_tokens, self.cfg.rollout.prompt_overflow
        kept, truncated, skipped = [], 0, 0
        for p in prompts:
            ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
            if len(ids) <= limit:
                kept.append(p)
            elif mode == "truncate":
                truncated += 1
                kept.append(self.tokenizer.decode(ids[-limit:]))
            else:
                skipped += 1
        if self.world > 1:
            counts = torch.tensor([truncated, skipped], device=self.acc.device)
            truncated, skipped = (int(x) for x in self.acc.reduce(counts, reduction="sum"))
        self.truncated_prompts += truncated
        self.skipped_prompts += skipped
        return kept

    # ----------------------------------------------------------------------------- step
    def _rank_shapes(self, x: Tensor) -> list[tuple[int, int]]:
        """Every rank's [b, T] (ranks may hold different numbers of rows: prompts skipped)."""
        if self.world == 1:
            return [(x.shape[0], x.shape[1])]
        shape = torch.tensor([x.shape[0], x.shape[1]], device=x.device)
        return [(int(b), int(t)) for b, t in self.acc.gather(shape).view(-1, 2).tolist()]

    def _gather_rows(self, x: Tensor, fill: float | bool, shapes: list[tuple[int, int]]) -> Tensor:
        """All ranks' rows of a per-position [b, T] tensor (`shapes`: `_rank_shapes`), in rank
        order, padded to the longest T."""
        if self.world == 1:
            return x
        b_max, t_max = max(b for b, _ in shapes), max(t for _, t in shapes)
        padded = torch.full((b_max, t_max), fill, dtype=x.dtype, device=x.device)
        padded[: x.shape[0], : x.shape[1]] = x
        g = self.acc.gather(padded)
        return torch.cat([g[r * b_max : r * b_max + b] for r, (b, _) in enumerate(shapes)])

    def _select(self, sig: TokenSignals, valid: Tensor, step: int) -> tuple[Tensor, float]:
        """Batch-scope selection over the global batch; returns this rank's mask and global n."""
        sel = self.cfg.selection
        names = [name for name, _ in sig.items()]
        t_local, b_local = valid.shape[1], valid.shape[0]
        shapes = self._rank_shapes(valid)
        g_valid = self._gather_rows(valid, False, shapes)
        g_sig = TokenSignals(**{n: self._gather_rows(getattr(sig, n), 0.0, shapes) for n in names})
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.train.seed * 1_000_003 + step)
        mask = select_tokens(
            g_sig.__class__(**{n: getattr(g_sig, n).cpu() for n in names}),
            g_valid.cpu(),
            strategy=sel.strategy,
            ratio=sel.ratio,
            scope=sel.scope,
            min_per_sequence=sel.min_per_sequence,
            generator=gen,
        ).to(valid.device)
        if self.cfg.loss.reduction == "token":
            norm = float(mask.sum())
        else:
            norm = float((mask.sum(-1) > 0).sum())
        first = sum(b for b, _ in shapes[: self.rank])  # this rank's first row
        local = mask[first : first + b_local, :t_local]
        return local, norm

    def _rollout(self, step: int) -> Rollout | None:
        prompts = self._fit_prompts([self.render(ex.question) for ex in self._next_examples()])
        if not prompts:
            return None
        return self._sample(prompts, self.cfg.train.seed * 1_000_003 + step * 101 + self.rank)

    def _sample(self, prompts: list[str], seed: int) -> Rollout:
        """Student rollouts with the configured sampling settings (rollout.*)."""
        ro = self.cfg.rollout
        return self.sampler(
            self.acc.unwrap_model(self.student),
            self.tokenizer,
            prompts,
            max_new_tokens=ro.max_new_tokens,
            temperature=ro.temperature,
            top_p=ro.top_p,
            greedy=ro.greedy,
            seed=seed,
        )

    @contextlib.contextmanager
    def _whole_student(self) -> Any:
        """Full student weights on every process for the block (FSDP, ZeRO-3); else a no-op."""
        if self.deepspeed:
            with zero.whole(self.student):
                yield
            return
        if not self.fsdp:
            yield
            return
        gather(self.units)
        try:
            yield
        finally:
            release(self.units)

    def _grad_forward(self, fn: Any) -> Any:
        """`fn(student)` for a pass with gradient (through the engine's forward under DeepSpeed)."""
        return fn(self.student) if self.engine is None else self.engine(fn)

    def _backward(self, loss: Tensor, last: bool) -> None:
        """Backward of one micro-batch's share of the globally normalized loss."""
        if self.engine is None:
            loss.backward()
            return
        self.engine.set_gradient_accumulation_boundary(last)
        # DeepSpeed averages gradients over processes; taopd's loss wants them summed
        self.engine.backward(loss * self.world, scale_wrt_gas=False)

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step; returns its metrics (None when the batch had nothing to train)."""
        cfg, step = self.cfg, self.step + 1
        t0 = time.perf_counter()
        with self._whole_student():  # FSDP: until the backward reshards; ZeRO-3: the whole pass
            out = self._forward_backward(step, t0)
        if out is None:
            self.step = step
            return None
        roll, sig, mask, total = out.roll, out.sig, out.mask, out.loss
        p = roll.prompt_len
        valid = roll.response_mask[:, p:]
        grad_norm, finite = self._optimizer_step(total)
        metrics: dict[str, Any] = {"step": step}
        if finite:
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            metrics["skipped_nonfinite"] = True
        self.sched.step()
        self.step = step
        n_sel_local = int(mask.sum())
        n_sel = self._sum(n_sel_local)
        self.tokens_trained += int(n_sel) if finite else 0
        elapsed = time.perf_counter() - t0
        metrics.update(self._signal_metrics(sig, valid, mask))
        metrics.update(
            loss=self._sum(total),  # each rank's share is normalized by the global count
            grad_norm=grad_norm,
            lr=self.sched.get_last_lr()[0],
            n_selected=int(n_sel),
            n_valid=int(self._sum(int(valid.sum()))),
            tokens_trained=self.tokens_trained,
            response_length=float(valid.sum(-1).float().mean()),
            rollout_seconds=out.rollout_seconds,
            scoring_seconds=out.scoring_seconds,
            step_seconds=elapsed,
            tokens_per_second=self._sum(int(valid.sum())) / elapsed,
            nonfinite_steps=self.nonfinite_total,
        )
        metrics["selected_fraction"] = metrics["n_selected"] / max(1, metrics["n_valid"])
        if cfg.train.samples_every and step % cfg.train.samples_every == 0:
            teacher_top = (out.served[0], out.served[1]) if out.served is not None else None
            with self._whole_student():
                self._write_samples(roll, sig, mask, out.h_s, out.h_t, step, teacher_top)
        if self.nonfinite_in_row >= cfg.train.max_nonfinite_steps:
            self._log(metrics)  # the run stops here: still record the skipped step
            ckpt = latest_checkpoint(self.out / "checkpoints")
            kept = f"the last checkpoint, {ckpt}, is kept" if ckpt else "no checkpoint was saved"
            raise TrainingError(
                f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient "
                f"(step {step}); stopping. Skipped steps change no weights and {kept}: lower "
                "optim.lr, check the teacher and the data, then --resume"
            )
        return metrics

    def _forward_backward(self, step: int, t0: float) -> StepPass | None:
        """Rollouts, scoring, selection and the selective loss's backward, per micro-batch.

        Every process runs the same number of micro-batches (collectives stay aligned when ranks
        skipped different prompts); a rank with fewer rows adds zero-loss passes.
        """
        cfg = self.cfg
        roll = self._rollout(step)
        t_roll = time.perf_counter() - t0
        if self.world > 1 and self._sum(float(roll is None)) > 0:
            roll = None  # a rank has no prompt left: every rank skips the step
        if roll is None:
            return None
        p = roll.prompt_len
        targets, valid = roll.input_ids[:, p:], roll.response_mask[:, p:]
        n_rows = targets.shape[0]
        mb = cfg.train.micro_batch_size or n_rows
        chunks = [slice(i, min(i + mb, n_rows)) for i in range(0, n_rows, mb)]
        n_passes = len(chunks)
        if self.world > 1:
            n = torch.tensor([n_passes], device=self.acc.device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
            n_passes = int(n)
        w_s = lm_head(self.student)
        self.student.train()
        w_t = h_t = None
        if self.server is None:
            w_t = lm_head(self.teacher)
            with torch.no_grad():
                h_t = torch.cat([response_hidden(self.teacher, roll, c) for c in chunks])
        if n_passes == 1:  # one student forward serves scoring (detached) and the loss
            h_s_grad = self._grad_forward(lambda m: response_hidden(m, roll, chunks[0]))
            h_s = h_s_grad.detach()
        else:  # scoring pass without grad, then a grad pass per micro-batch
            h_s_grad = None
            with torch.no_grad():
                h_s = torch.cat([response_hidden(self.student, roll, c) for c in chunks])
        lcfg = cfg.loss
        sig, served = self._score(roll, h_s, w_s, h_t, w_t)
        t_token_lp = served[2] if served is not None else None
        mask, norm = self._select(sig, valid, step)
        t_score = time.perf_counter() - t0 - t_roll
        if norm == 0:
            raise TrainingError("selection kept no positions in the whole batch")
        loss_kw = dict(
            kind=lcfg.kind,
            normalizer=norm,
            reduction=lcfg.reduction,
            beta=lcfg.beta,
            temperature=lcfg.temperature,
            vocab_size=self.vocab_size,
            chunk_size=lcfg.chunk_size,
        )
        total = 0.0
        for i in range(n_passes):
            if self.fsdp and i > 0:  # the previous backward resharded the weights
                gather(self.units)
                w_s = lm_head(self.student)
            c = chunks[min(i, len(chunks) - 1)]
            if h_s_grad is None:
                h = self._grad_forward(lambda m, c=c: response_hidden(m, roll, c))
            else:
                h = h_s_grad
            if i >= len(chunks):  # padding pass: zero gradients, same collectives
                loss = (h.sum() + w_s.sum()) * 0.0
            else:
                if t_token_lp is not None:
                    teacher_kw = {"teacher_token_logprobs": t_token_lp[c]}
                else:
                    teacher_kw = {"teacher_hidden": h_t[c], "teacher_weight": w_t}
                loss = selective_head_loss(
                    h, w_s, mask[c], tokens=targets[c], **teacher_kw, **loss_kw
                )
            self._backward(loss, last=i == n_passes - 1)
            total += float(loss.detach())
        return StepPass(roll, sig, mask, h_s, h_t, served, total, t_roll, t_score)

    def _optimizer_step(self, loss_value: float) -> tuple[float, bool]:
        """Reduce (DDP), check and clip the gradients, step unless non-finite; zero them."""
        if self.engine is not None:  # DeepSpeed clips and skips non-finite steps itself
            self.engine.step()
            norm = float(self.engine.get_global_grad_norm() or 0.0)
            finite = self.engine.was_step_applied() and math.isfinite(self._sum(loss_value))
            return norm, finite and math.isfinite(norm)
        grad_norm, finite = self._reduce_and_clip(loss_value)
        if finite:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm, finite

    def _score(
        self, roll: Rollout, h_s: Tensor, w_s: Tensor, h_t: Tensor | None, w_t: Tensor | None
    ) -> tuple[TokenSignals, tuple[Tensor, Tensor, Tensor] | None]:
        """Per-position signals of this rank's rollouts, from the in-process or served teacher.

        With a served teacher, also returns its (top ids, their log-probs, log p_T(y_t)).
        """
        sel, p = self.cfg.selection, roll.prompt_len
        targets, valid = roll.input_ids[:, p:], roll.response_mask[:, p:]
        common = dict(
            k=sel.k,
            valid=valid,
            vocab_size=self.vocab_size,
            chunk_size=sel.chunk_size,
            projection_dtype=self.projection_dtype,
        )
        if self.server is None:
            sig = signals_from_hidden(
                h_s, w_s, h_t, w_t, tokens=targets, temperature=self.cfg.loss.temperature, **common
            )
            return sig, None
        # this rank's rows go to the server; loss.temperature is 1 (config check)
        served = self.server.score(
            roll.input_ids, roll.attention_mask, roll.response_mask, p, self.vocab_size
        )
        return signals_from_teacher_topk(h_s, w_s, *served, targets, **common), served

    def _sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], device=self.acc.device, dtype=torch.float64)
        return float(self.acc.reduce(t, reduction="sum"))

    def _reduce_and_clip(self, loss_value: float) -> tuple[float, bool]:
        """Sum gradients over ranks (the loss is already globally normalized), check, clip."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.world > 1 and not self.fsdp:  # FSDP reduce-scatters (sums) in the backward
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
        grads = [p.grad for p in params if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # sharded gradients: the norm over all shards
            norm = norm.full_tensor()
        finite = bool(torch.isfinite(norm)) and math.isfinite(self._sum(loss_value)) and bool(grads)
        return float(norm), finite

    def _signal_metrics(self, sig: TokenSignals, valid: Tensor, mask: Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        teach = teachability_of(sig, valid)
        values = {"teachability": teach, "kl": sig.reverse_kl, "forward_kl": sig.forward_kl}
        for name in ("student_entropy", "teacher_entropy", "disagreement", "compatibility"):
            values[name.replace("student_", "")] = getattr(sig, name)
        if self.server is not None:  # no full teacher: the sampled-token estimate of KL(S‖T)
            values = {n: x for n, x in values.items() if not bool(torch.isnan(x).all())}
            values["kl_sampled"] = sig.log_ratio
        for name, x in values.items():
            out[f"{name}_all"] = _mean(x, valid)
            out[f"{name}_selected"] = _mean(x, mask)
        out["overlap_all"] = _mean(sig.overlap, valid)
        out.update(kl_concentration(sig.reverse_kl, valid))
        return out

    def _write_samples(
        self,
        roll: Rollout,
        sig: TokenSignals,
        mask: Tensor,
        h_s: Tensor,
        h_t: Tensor | None,
        step: int,
        teacher_top: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Append two rollouts of this step to samples.jsonl (the report's token view)."""
        if not self.acc.is_main_process:
            return
        lines = token_samples(
            self.tokenizer,
            roll,
            sig,
            mask,
            h_s,
            h_t,
            lm_head(self.student),
            lm_head(self.teacher) if self.teacher is not None else None,
            self.vocab_size,
            step,
            rows=2,
            teacher_top=teacher_top,
        )
        with open(self.out / "samples.jsonl", "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")

    # ----------------------------------------------------------------------------- eval
    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        """Greedy accuracy on the test split (every rank evaluates its share; reduced)."""
        whole = self._whole_student() if model is None else contextlib.nullcontext()
        model = model if model is not None else self.acc.unwrap_model(self.student)
        ex = self.test_examples[self.rank :: self.world]
        with whole:
            res = self._evaluate_share(model, ex)
        correct = self._sum(res["n_correct"])
        return correct / self._sum(res["n"])

    def _evaluate_served(self) -> float:
        """Greedy accuracy of the served teacher (temperature 0 completions), reduced over ranks."""
        assert self.server is not None
        ex = self.test_examples[self.rank :: self.world]
        prompts = [self.render(e.question) for e in ex]
        ids = []
        if prompts:  # the token ids the in-process evaluation feeds `generate`, unpadded
            grid, mask = tokenize_left(self.tokenizer, prompts)
            ids = [row[m.bool()].tolist() for row, m in zip(grid, mask)]
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        outs = self.server.generate(ids, self.cfg.eval.max_new_tokens, eos) if ids else []
        correct = 0
        for e, out in zip(ex, outs, strict=True):
            text = (
                out
                if isinstance(out, str)
                else self.tokenizer.decode(out, skip_special_tokens=True)
            )
            correct += is_correct(self.task.score(text, e))
        return self._sum(correct) / self._sum(len(ex))

    def _evaluate_share(self, model: torch.nn.Module, ex: list[Example]) -> dict[str, Any]:
        if not ex:  # more processes than test problems: this rank has none
            return {"n_correct": 0, "n": 0}
        return evaluate(
            model,
            self.tokenizer,
            self.task,
            ex,
            batch_size=self.cfg.eval.batch_size,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            system_prompt=self.cfg.task.system_prompt,
            progress=self.progress and self.acc.is_main_process,
            chat_template=self.cfg.task.chat_template,
        )

    def heldout_kl(self) -> float | None:
        """Mean KL(p_S‖p_T) over the held-out bank (see `_heldout_kl`)."""
        with self._whole_student():
            return self._heldout_kl()

    @torch.no_grad()
    def _heldout_kl(self) -> float | None:
        """Mean KL(p_S‖p_T) over a fixed bank of student rollouts on test prompts.

        The bank is sampled once from the initial student and saved in the run folder, so every
        evaluation (and every arm of a comparison with the same seed) scores the same contexts.
        """
        n = min(self.cfg.eval.heldout_kl_prompts, len(self.test_examples))
        if n == 0 or self.server is not None:  # a served teacher gives no full-vocabulary KL
            return None
        path = self.out / "heldout_bank.pt"
        if self._bank is None:
            saved = path.exists()
            if self.world > 1:  # decide together, before rank 0 may write the file
                saved = self._sum(float(saved)) == self.world
                self.acc.wait_for_everyone()
            if saved:
                self._bank = load_rollout(path, "held-out bank")[0]
            else:
                prompts = [self.render(ex.question) for ex in self.test_examples[:n]]
                roll = self._sample(prompts, seed=self.cfg.train.seed + 12345).to("cpu")
                self._bank = roll
                if self.acc.is_main_process:
                    save_rollout(path, roll)
        roll = self._bank.to(self.acc.device)
        rows = list(range(len(roll)))[self.rank :: self.world]
        if not rows:  # more processes than bank rollouts: this rank adds nothing
            return self._sum(0.0) / max(1.0, self._sum(0))
        p = roll.prompt_len
        sub = Rollout(
            roll.input_ids[rows],
            roll.attention_mask[rows],
            roll.response_mask[rows],
            p,
            [roll.texts[i] for i in rows],
        )
        model = self.acc.unwrap_model(self.student)
        h_s = response_hidden(model, sub, slice(None))
        h_t = response_hidden(self.teacher, sub, slice(None))
        valid = sub.response_mask[:, p:]
        sig = signals_from_hidden(
            h_s,
            lm_head(model),
            h_t,
            lm_head(self.teacher),
            k=1,
            valid=valid,
            temperature=self.cfg.loss.temperature,
            vocab_size=self.vocab_size,
            chunk_size=self.cfg.selection.chunk_size,
        )
        total = self._sum(float(sig.reverse_kl[valid].sum()))
        return total / max(1.0, self._sum(int(valid.sum())))

    # ----------------------------------------------------------------------------- state
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data_pos": self.data_pos,
            "optimizer": None if self.fsdp or self.deepspeed else self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng_state(),
            "tokens_trained": self.tokens_trained,
            "nonfinite_total": self.nonfinite_total,
            "skipped_prompts": self.skipped_prompts,
            "truncated_prompts": self.truncated_prompts,
            "history": self.history,
            "config": self.cfg.model_dump(mode="json"),
        }

    def _wall_seconds(self) -> float:
        start, before = getattr(self, "_clock", (time.perf_counter(), 0.0))
        return before + time.perf_counter() - start

    def save(self) -> Path | None:
        """Write an atomic checkpoint (rank 0), keeping the newest `train.keep_last`."""
        self.history["wall_seconds"] = self._wall_seconds()
        path = None
        weights: dict[str, Tensor] | None = None
        state = self._trainer_state() if self.acc.is_main_process else {}
        if self.fsdp:  # collectives: every rank takes part, rank 0 receives the whole state
            weights = full_model_state(self.student)
            state["optimizer"] = full_optimizer_state(self.student, self.opt)
        elif self.deepspeed:
            weights = zero.full_model_state(self.student)
            state["optimizer"] = zero.full_optimizer_state(self.student, self.opt)
        state["optimizer_format"] = self._optimizer_format()
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.student)

            def save_model(d: Path) -> None:
                model.save_pretrained(d, safe_serialization=True, state_dict=weights)
                self.tokenizer.save_pretrained(d)

            path = save_checkpoint(
                self.out / "checkpoints",
                self.step,
                save_model,
                state,
                keep_last=self.cfg.train.keep_last,
            )
        self.acc.wait_for_everyone()
        return path

    def _optimizer_format(self) -> str:
        """How the optimizer state is saved: whole from FSDP / DeepSpeed shards, or replicated."""
        return "fsdp-full" if self.fsdp else "deepspeed-full" if self.deepspeed else "replicated"

    def _load_weights(self, ckpt: Path) -> None:
        """The student weights of a checkpoint, into the (not yet sharded) student."""
        from safetensors.torch import load_file

        model = self.student
        weights = {}
        for f in sorted((ckpt / "model").glob("*.safetensors")):
            weights.update(load_file(f))
        if self.cfg.lora is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, weights)
        else:
            try:
                missing, unexpected = model.load_state_dict(weights, strict=False)
            except RuntimeError as e:  # shapes differ
                first = str(e).strip().splitlines()[-1].strip()
                raise UserError(f"checkpoint {ckpt} does not match the student: {first}") from None
            missing = [m for m in missing if "lm_head" not in m]  # tied heads are not saved
            if missing or unexpected:
                raise UserError(f"checkpoint {ckpt} does not match the student: {missing[:3]}")
            if hasattr(model, "tie_weights"):
                model.tie_weights()

    def _load(self, ckpt: Path) -> None:
        """Weights (unless already loaded before sharding), optimizer, schedule, RNG, counters."""
        state = load_trainer_state(ckpt)
        written = state.get("optimizer_format") or "replicated"
        if written != self._optimizer_format():
            how = {"fsdp-full": "FSDP", "deepspeed-full": "DeepSpeed"}
            raise UserError(
                f"checkpoint {ckpt} was written by a {how.get(written, 'replicated')} run and "
                f"this one is {how.get(self._optimizer_format(), 'replicated')}; resume it the "
                "same way (train.fsdp / train.deepspeed, or the same accelerate config)"
            )
        if self.fsdp:
            set_full_optimizer_state(self.student, self.opt, state["optimizer"])
        elif self.deepspeed:
            zero.set_full_optimizer_state(self.student, self.engine, self.opt, state["optimizer"])
        else:
            self._load_weights(ckpt)
            self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.data_pos = state["step"], state["data_pos"]
        self.tokens_trained = state["tokens_trained"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.skipped_prompts = state.get("skipped_prompts", 0)
        self.truncated_prompts = state.get("truncated_prompts", 0)
        self.history = state.get("history", {})
        self._apply_optim_config()
        self._truncate_metrics(self.step)

    def _apply_optim_config(self) -> None:
        """After a resume, use this config's optimizer settings (e.g. a lowered optim.lr).

        The optimizer's saved state brings back the old lr, betas and weight decay; unchanged
        values give exactly the lr the uninterrupted run would have had.
        """
        o, groups = self.cfg.optim, self.opt.param_groups
        for g in groups:
            g.update(weight_decay=o.weight_decay, betas=tuple(o.betas), initial_lr=o.lr)
        self.sched.base_lrs = [o.lr] * len(groups)
        for g, factor in zip(groups, self.sched.lr_lambdas):
            g["lr"] = o.lr * factor(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in groups]

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone).

        A line cut short by a kill is dropped too.
        """
        if not self.acc.is_main_process:
            return
        for path in (self.out / "metrics.jsonl", self.out / "samples.jsonl"):
            if not path.exists():
                continue
            keep = []
            for ln in path.read_text().splitlines():
                try:
                    if json.loads(ln)["step"] <= step:
                        keep.append(ln)
                except (ValueError, KeyError, TypeError):
                    continue
            atomic_write_text(path, "".join(k + "\n" for k in keep))

    def _log(self, metrics: dict[str, Any]) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, metrics["step"])

    # ----------------------------------------------------------------------------- run
    def _on_signal(self, signum: int, frame: Any) -> None:
        """First SIGINT/SIGTERM: finish the step, save, stop. A second one: quit at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.acc.is_main_process:
            print(
                f"\ntaopd: {signal.Signals(signum).name}: stopping after this step and saving a "
                "checkpoint (send it again to quit without saving)",
                file=sys.stderr,
                flush=True,
            )

    def run(self) -> dict[str, Any]:
        """Train `train.steps` steps with evaluation and checkpoints; return the summary."""
        cfg = self.cfg
        # wall time survives resume: the time up to the last checkpoint is kept in its history
        self._clock = (time.perf_counter(), self.history.get("wall_seconds", 0.0))
        old_handlers = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                old_handlers[s] = signal.signal(s, self._on_signal)
        h = self.history
        try:
            if "teacher_accuracy" not in h and cfg.train.eval_teacher:
                h["teacher_accuracy"] = (
                    self.evaluate(self.teacher) if self.server is None else self._evaluate_served()
                )
            if "student_accuracy_before" not in h and cfg.train.eval_before:
                h["student_accuracy_before"] = self.evaluate()
            if "heldout_kl_before" not in h:
                h["heldout_kl_before"] = self.heldout_kl()
            h.setdefault("selected_fractions", [])
            h.setdefault("accuracy_curve", [])
            bar = tqdm(
                total=cfg.train.steps,
                initial=self.step,
                desc="TA-OPD"
                if cfg.selection.strategy == "teachability"
                else f"OPD ({cfg.selection.strategy})",
                disable=not (self.progress and self.acc.is_main_process),
            )
            while self.step < cfg.train.steps and not self.stop_requested:
                try:
                    metrics = self.train_step()
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if (oom := out_of_memory(e, self.step + 1, self.out)) is None:
                        raise
                    raise TrainingError(oom) from None
                if metrics is None:  # every prompt of the batch was skipped (too long)
                    bar.update(1)
                    if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                        self.save()
                    continue
                h["selected_fractions"].append(metrics["selected_fraction"])
                last = self.step == cfg.train.steps
                if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or last):
                    metrics["accuracy"] = self.evaluate()
                    metrics["heldout_kl"] = self.heldout_kl()
                    h["accuracy_curve"].append(
                        [self.step, self.tokens_trained, metrics["accuracy"], metrics["heldout_kl"]]
                    )
                self._log(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", kept=metrics["n_selected"])
                if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                    self.save()
            bar.close()
            if self.stop_requested:
                saved = self.save()
                raise TrainingError(
                    f"stopped by a signal at step {self.step}; checkpoint saved"
                    f"{f' to {saved}' if saved else ''}, continue with --resume"
                )
            if h["accuracy_curve"] and h["accuracy_curve"][-1][0] == self.step:
                _, _, after, kl_after = h["accuracy_curve"][-1]
            else:
                after, kl_after = self.evaluate(), self.heldout_kl()
            summary = self._summary(after, kl_after, self._wall_seconds())
            if not (cfg.train.save_every and self.step % cfg.train.save_every == 0):
                self.save()  # the final weights (unless the last step was just saved)
            if self.acc.is_main_process:
                atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        finally:
            for s, old in old_handlers.items():
                signal.signal(s, old)
            if self.tb is not None:
                self.tb.flush()
            self.close()
        return summary

    def close(self) -> None:
        """Let go of the run folder (its lock), e.g. for another trainer in this process."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()
            self._lock = None

    def _summary(self, after: float, kl_after: float | None, seconds: float) -> dict[str, Any]:
        h, cfg = self.history, self.cfg
        fr = h.get("selected_fractions") or [float("nan")]
        return {
            "teacher_accuracy": h.get("teacher_accuracy"),
            "student_accuracy_before": h.get("student_accuracy_before"),
            "student_accuracy_after": after,
            "n_test": len(self.test_examples),
            "heldout_kl_before": h.get("heldout_kl_before"),
            "heldout_kl": kl_after,
            "selected_fraction": sum(fr) / len(fr),
            "tokens_trained": self.tokens_trained,
            "steps": self.step,
            "strategy": cfg.selection.strategy,
            "ratio": cfg.selection.ratio,
            "k": cfg.selection.k,
            "batch_size": cfg.train.batch_size,
            "world_size": self.world,
            "fsdp": self.fsdp,
            "deepspeed": self.deepspeed,
            "seed": cfg.train.seed,
            "wall_seconds": seconds,
            "accuracy_curve": h.get("accuracy_curve", []),
            "teacher": self.teacher_path,
            "student": cfg.student,
            "task": cfg.task.name or cfg.task.path,
            "nonfinite_steps": self.nonfinite_total,
            "skipped_prompts": self.skipped_prompts,
            "truncated_prompts": self.truncated_prompts,
            "output_dir": str(self.out),
        }


def train(
    cfg: Config, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Build a Trainer and run it; returns the summary dict (also in output_dir/summary.json)."""
    return Trainer(cfg, resume=resume, overwrite=overwrite, progress=progress).run()

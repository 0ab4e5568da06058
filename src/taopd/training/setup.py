"""A training run's setup, in three phases that read top to bottom: `check`, `claim`, `build`.

1. `check` validates every input and writes nothing: the config against the processes, the
   teacher server, the output folder and the checkpoint to resume, the task files, the models'
   folders, tokenizers, vocabularies and contexts (from their configs, on the meta device), the
   resume state and a held-out bank left in the folder. It returns a `Plan`. On the way it
   prints a notice for a size cut to what the data holds and a warning for a GPU-sized config
   on a CPU (sizing.py).
2. `claim` takes the run folder: creates and locks it, clears a run replaced by --overwrite,
   writes the marker and config.yaml. Only inputs that passed every check get here.
3. `build` loads and makes what a `Trainer` runs on (a `Run`): the cached fine-tunes, teacher
   and student, the student engine and its optimizer, the sampler, the prompt stream, the
   evaluator, and a resumed run's state (its logs cut back to the checkpoint).

`Trainer(cfg, ...)` (train.py) runs the three in order; the order of the checks inside `check`
is the one tests/test_reliability.py and tests/test_cli.py pin.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import Config
from ..core.scores import Workspace
from ..data import (
    Example,
    PromptStream,
    Task,
    make_tagger,
    make_task,
    render_prompt,
    size_notice,
)
from ..errors import UserError, notice, quiet_deepspeed_notice
from ..models import (
    apply_lora,
    check_context,
    check_models,
    load_model,
    model_skeleton,
    shared_vocab_size,
)
from . import sizing
from .checkpoint import (
    apply_optim_config,
    check_checkpoint_student,
    load_rollout,
    load_trainer_state,
    set_rng_state,
)
from .collectives import Group
from .engines import StudentEngine, engine_kind, make_engine, make_scheduler, optimizer_format
from .evaluate import Evaluator
from .resume import Change, finished_summary, resume_changes, resuming_line
from .run_dir import RunFolder
from .sampling import make_sampler
from .teacher_server import TeacherServer
from .teachers import LocalTeacher, ServedTeacher, Teacher
from .trackers import check_trackers

__all__ = ["Loaders", "Plan", "Run", "build", "check", "claim"]


# ----------------------------------------------------------------------------- 1. check
@dataclass
class Plan:
    """What `check` resolved for a run: nothing loaded but tokenizers, nothing written."""

    cfg: Config
    acc: Any  # the accelerate.Accelerator the run's processes share
    group: Group
    engine_kind: str  # replicated, fsdp or deepspeed
    server: TeacherServer | None  # a served teacher, connected
    run_dir: RunFolder  # checked, not yet claimed
    resume_from: Path | None  # the checkpoint a --resume continues from
    resume_state: dict[str, Any] | None  # its trainer state (handed to `build`, then dropped)
    task: Task
    train_examples: list[Example]
    test_examples: list[Example]
    tokenizer: Any  # the student's (the teacher's agrees)
    vocab_size: int  # vocabulary rows both models score
    changes: list[Change] = field(default_factory=list)  # what a --resume changes (accepted)
    finished: dict[str, Any] | None = None  # a resumed run that already finished: its summary

    def render(self, question: str) -> str:
        """The prompt text of `question` (task.system_prompt, task.chat_template)."""
        t = self.cfg.task
        return render_prompt(self.tokenizer, question, t.system_prompt, t.chat_template)

    def close(self) -> None:
        """Let go of the run folder's lock and the teacher server's connections."""
        self.run_dir.close()
        if self.server is not None:
            self.server.close()


def check(
    cfg: Config, resume: bool = False, overwrite: bool = False, accelerator: Any | None = None
) -> Plan:
    """Phase 1: every check of a run's inputs, in the order the tests pin; writes nothing."""
    acc = accelerator or _accelerator(cfg)
    kind = engine_kind(cfg, acc)
    quiet_deepspeed_notice(kind != "deepspeed")  # its CPU notice, only where DeepSpeed runs
    group = Group(acc)
    if cfg.train.batch_size % group.world:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by the "
            f"{group.world} processes"
        )
    check_trackers(cfg.train)  # train.report_to: a missing package fails before any work
    server = None
    if cfg.teacher_server is not None:  # fail fast, before the output folder is looked at
        server = TeacherServer.from_config(cfg.teacher_server)
        server.connect()
    try:
        run_dir = RunFolder(Path(cfg.output_dir), group)
        resume_from = run_dir.prepare(resume, overwrite)
        changes = resume_changes(run_dir.path, cfg) if resume_from is not None else []
        task, train_examples, test_examples = _examples(cfg)
        tokenizer = check_models(cfg, teacher_served=server is not None)
        plan = Plan(
            cfg, acc, group, kind, server, run_dir, resume_from, None, task, train_examples,
            test_examples, tokenizer, vocab_size=len(tokenizer), changes=changes,
        )  # fmt: skip
        _check_models_fit(plan)
        _check_resume_state(plan)
        _check_heldout_bank(plan)
    except BaseException:
        if server is not None:
            server.close()
        raise
    return plan


def _accelerator(cfg: Config) -> Any:
    """The run's Accelerator; train.collective_timeout_s bounds a collective (a dead peer)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    pg = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[pg])


def _examples(cfg: Config) -> tuple[Task, list[Example], list[Example]]:
    """The task, its training examples and its eval split (eval.split), checked for size."""
    task = make_task({**cfg.task.as_task_dict(), "suffix": cfg.task.prompt_suffix or None})
    train_examples = task.examples("train", cfg.task.n_train, seed=cfg.task.seed)
    # eval.split: "validation" (disjoint from train and test) for choosing settings
    test_examples = task.examples(cfg.eval.split, cfg.task.n_test, seed=cfg.task.seed)
    if not train_examples:
        raise UserError("the task gave no training examples")
    if cfg.train.batch_size > len(train_examples):
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} exceeds the task's "
            f"{len(train_examples)} training examples; lower it or raise task.n_train"
        )
    n_test, bank = len(test_examples), cfg.eval.heldout_kl_prompts
    if cut := size_notice(task, cfg.eval.split, cfg.task.n_test, n_test, "task.n_test"):
        notice(cut)
    if 0 < n_test < bank:
        notice(
            f"eval.heldout_kl_prompts {bank} > {n_test} {cfg.eval.split} problems: using {n_test}"
        )
    return task, train_examples, test_examples


def _check_models_fit(plan: Plan) -> None:
    """The models against the tokenizer, the prompts and a resumed checkpoint, from their
    configs on the meta device (`model_skeleton`): weight files, lm_head rows, context."""
    cfg = plan.cfg
    teacher = None if plan.server is not None else model_skeleton(cfg.teacher)
    student = model_skeleton(cfg.student)
    plan.vocab_size = shared_vocab_size(plan.tokenizer, student, teacher)
    check_context(
        {"student": student, "teacher": teacher}, plan.tokenizer, plan.render, cfg,
        [e.question for e in plan.train_examples], [e.question for e in plan.test_examples],
    )  # fmt: skip
    if plan.acc.device.type == "cpu":
        _warn_if_gpu_sized(plan, student, teacher)
    if plan.resume_from is not None and cfg.lora is None:
        check_checkpoint_student(plan.resume_from, student)
    if plan.resume_from is not None and plan.engine_kind == "deepspeed":
        from .engines.zero import check_resumable

        check_resumable(student, plan.group.world)


def _warn_if_gpu_sized(plan: Plan, student: nn.Module, teacher: nn.Module | None) -> None:
    """A loud warning before a config sized for a GPU runs on this CPU (sizing.py)."""
    questions = [e.question for e in plan.train_examples[:64]]
    ids = plan.tokenizer([plan.render(q) for q in questions], add_special_tokens=False)
    lengths = [min(len(x), plan.cfg.rollout.max_prompt_tokens) for x in ids["input_ids"]]
    prompt = sum(lengths) / max(len(lengths), 1)
    flops = sizing.cpu_matmul_flops()
    n_s, n_t = sizing.param_count(student), sizing.param_count(teacher)
    if warning := sizing.gpu_sized_warning(plan.cfg, n_s, n_t, prompt, flops):
        notice(warning)


def _check_resume_state(plan: Plan) -> None:
    """A resumed checkpoint's trainer state, and that this run holds the optimizer as it did."""
    ckpt = plan.resume_from
    if ckpt is None:
        return
    state = load_trainer_state(ckpt)
    plan.finished = finished_summary(plan.run_dir.path, plan.cfg.train.steps)
    if plan.finished is None and plan.cfg.train.steps < state["step"]:
        raise UserError(
            f"--resume: train.steps={plan.cfg.train.steps} is below step {state['step']} of "
            f"checkpoint {ckpt}; set train.steps to {state['step']} or more"
        )
    written = state.get("optimizer_format") or "replicated"
    own = optimizer_format(plan.engine_kind)
    if written != own:
        how = {"fsdp-full": "FSDP", "deepspeed-full": "DeepSpeed"}
        raise UserError(
            f"checkpoint {ckpt} was written by a {how.get(written, 'replicated')} run and "
            f"this one is {how.get(own, 'replicated')}; resume it "
            "the same way (train.fsdp / train.deepspeed, or the same accelerate config)"
        )
    plan.resume_state = state


def _check_heldout_bank(plan: Plan) -> None:
    """A held-out bank the run will read (left in output_dir, not replaced) must load."""
    path = plan.run_dir.path / "heldout_bank.pt"
    n = min(plan.cfg.eval.heldout_kl_prompts, len(plan.test_examples))
    if n > 0 and plan.server is None and not plan.run_dir.replaces_run and path.is_file():
        load_rollout(path, "held-out bank")


# ----------------------------------------------------------------------------- 2. claim
def claim(plan: Plan) -> None:
    """Phase 2: claim the run folder (lock, marker, config.yaml). A resume rewrites config.yaml
    with the accepted changes and says where it continues from (a finished run: nothing)."""
    if plan.finished is not None:  # Trainer.run() says so and returns its summary
        plan.run_dir.commit(None)
        return
    plan.run_dir.commit(plan.cfg.to_yaml())
    if plan.resume_state is not None and plan.group.is_main:
        print(resuming_line(plan.resume_state["step"], plan.changes), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- 3. build
class Loaders(NamedTuple):
    """How `build` loads a model and makes the sampler (train.py passes its own names, so a
    test that swaps `taopd.training.train.load_model` or `make_sampler` reaches the run)."""

    load_model: Callable[..., Any] = load_model
    make_sampler: Callable[[Config], Any] = make_sampler


@dataclass
class Run:
    """What `build` made for one Trainer, and where a resumed run stands (`state`)."""

    plan: Plan
    progress: bool
    threads: int  # torch's CPU threads (train.threads, or the free cores)
    student: nn.Module
    teacher: Teacher
    engine: StudentEngine
    sched: Any
    sampler: Any
    prompts: PromptStream
    tagger: Any  # position kinds (planted style or none)
    evaluator: Evaluator
    score_kw: dict[str, Any]
    loss_kw: dict[str, Any]
    state: dict[str, Any] | None  # the resumed trainer state, less its optimizer state


def build(plan: Plan, threads: int, progress: bool = True, loaders: Loaders | None = None) -> Run:
    """Phase 3: load the models and build what runs on them; resume last (its RNG state)."""
    cfg, loaders = plan.cfg, loaders or Loaders()
    teacher_name, teacher_model, student = _load_models(plan, progress, loaders)
    teacher: Teacher = (
        LocalTeacher(teacher_model, teacher_name)
        if teacher_model is not None
        else ServedTeacher(plan.server, plan.vocab_size)
    )
    engine = make_engine(plan.engine_kind, student, plan.group, cfg, plan.resume_from)
    score_kw, loss_kw = _step_settings(cfg, plan.vocab_size)
    sched = make_scheduler(engine.opt, cfg)
    sampler = loaders.make_sampler(cfg)  # rollout.backend; vllm: student + rollout.vllm
    ro = cfg.rollout
    prompts = PromptStream(
        plan.train_examples, plan.render, plan.tokenizer, cfg.train.seed,
        ro.max_prompt_tokens, ro.prompt_overflow, plan.group,
    )  # fmt: skip
    style = cfg.teacher_sft.style if cfg.teacher_sft is not None else None
    tagger = make_tagger(style, plan.tokenizer)
    evaluator = Evaluator(plan.task, plan.test_examples, plan.tokenizer, cfg, plan.group, progress)
    state = _resume(plan, engine, sched, prompts)
    return Run(
        plan, progress, threads, student, teacher, engine, sched, sampler, prompts, tagger,
        evaluator, score_kw, loss_kw, state,
    )  # fmt: skip


def _load_models(
    plan: Plan, progress: bool, loaders: Loaders
) -> tuple[str, nn.Module | None, nn.Module]:
    """The teacher (its name, and its weights unless served) and the student, after their
    cached fine-tunes (teacher_sft, student_sft) when configured."""
    cfg, acc = plan.cfg, plan.acc
    teacher_name = cfg.teacher
    if cfg.teacher_sft is not None:
        from .sft import prepare_teacher

        with acc.main_process_first():
            teacher_name = str(prepare_teacher(cfg, progress=progress))
    student_name = cfg.student
    if cfg.student_sft is not None:  # warm start on the task's format (cached)
        from .sft import prepare_student

        with acc.main_process_first():
            student_name = str(prepare_student(cfg, progress=progress))
    teacher_model = None
    if plan.server is None:
        t_dtype = cfg.train.teacher_dtype or cfg.train.dtype
        teacher_model = loaders.load_model(teacher_name, dtype=t_dtype, device=acc.device)
        teacher_model.eval().requires_grad_(False)
    student = loaders.load_model(student_name, dtype=cfg.train.dtype, device=acc.device)
    if cfg.lora is not None:
        student = apply_lora(student, cfg.lora)
    return teacher_name, teacher_model, student


def _step_settings(cfg: Config, vocab_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keyword arguments of a step's scoring (`score_rollout`) and loss."""
    pd = cfg.selection.projection_dtype
    score_kw = dict(
        k=cfg.selection.k,
        vocab_size=vocab_size,
        chunk_size=cfg.selection.chunk_size,
        temperature=cfg.loss.temperature,
        projection_dtype=None if pd == "auto" else getattr(torch, pd),
        workspace=Workspace(),  # the scoring buffers stay allocated from step to step
    )
    lc = cfg.loss
    loss_kw = dict(
        kind=lc.kind,
        reduction=lc.reduction,
        beta=lc.beta,
        temperature=lc.temperature,
        vocab_size=vocab_size,
        chunk_size=lc.chunk_size,
    )
    return score_kw, loss_kw


def _resume(
    plan: Plan, engine: StudentEngine, sched: Any, prompts: PromptStream
) -> dict[str, Any] | None:
    """A resumed run's weights (unless loaded before sharding), optimizer, schedule, RNG and
    prompt position; its logs cut back to the checkpoint. Returns the trainer state, less the
    optimizer's (None for a fresh start)."""
    ckpt, state = plan.resume_from, plan.resume_state
    if ckpt is None or state is None:
        return None
    plan.resume_state = None  # the optimizer state is the engine's now: not kept twice
    cfg = plan.cfg
    engine.load_state(ckpt, state.pop("optimizer"), cfg.lora is not None)
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    prompts.load_state(state)
    apply_optim_config(engine.opt, sched, cfg.optim)
    plan.run_dir.truncate_logs(state["step"])
    if plan.finished is None:  # summary.json lists every resume and what it changed
        changed = {c.field: [c.saved, c.new] for c in plan.changes}
        state.setdefault("history", {}).setdefault("resumes", [])
        state["history"]["resumes"].append({"step": state["step"], "changed": changed})
    return state

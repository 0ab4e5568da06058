"""The selective OPD loop: rollouts, teacher scoring, selection, selective-head loss, on accelerate.

`Trainer.train_step` is one step of the method (docs/method.md), with no backend branches:
the student samples responses; the teacher answers for them (teachers.py: in process, or a
server's top-k log-probs); signals are scored from detached hidden states in chunks; the strategy
keeps a share of the global batch's response positions; only those rows go through the student's
lm_head with gradient, and the student engine (engines/: replicated, FSDP2, DeepSpeed ZeRO)
backpropagates and steps (its pieces: step.py). Before it, setup.py checks every input, claims
the run folder and builds what the Trainer runs on (`setup_run`); around it: the run folder
(run_dir.py), checkpoints (checkpoint.py), evaluation and the held-out KL (evaluate.py).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import seeds
from ..config import Config
from ..core.loss import selective_head_loss
from ..data import render_prompt
from ..models import lm_head, load_model
from .checkpoint import latest_checkpoint, rng_state, save_checkpoint
from .checkpoint import load_trainer_state as load_trainer_state  # still importable from here
from .evaluate import is_correct
from .metrics import kind_metrics, run_summary, signal_metrics, weight_metrics
from .resume import finished_run, say_finished
from .rollout import Rollout
from .run_dir import lost_peer, out_of_memory
from .samples import token_samples
from .sampling import make_sampler
from .setup import Loaders, Run, build, check, claim
from .step import (
    PHASES,
    PhaseClock,
    RunStopped,
    StepPass,
    TrainingError,
    kept_pass,
    kept_share,
    micro_batches,
    pass_input,
    select_batch,
    student_hidden,
)
from .teachers import score_rollout
from .threads import free_cores, set_threads
from .trackers import Trackers

__all__ = [
    "PHASES", "RunStopped", "Trainer", "TrainingError", "free_cores", "set_threads", "setup_run",
    "train", "token_samples",
]  # fmt: skip


class Trainer:
    """Selective OPD trainer; `run()` trains, evaluates, checkpoints and writes summary.json."""

    def __init__(
        self,
        cfg: Config | Run,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        accelerator: Any | None = None,
    ) -> None:
        """A trainer over what setup built (a `Run`); a Config is set up first (`setup_run`)."""
        if isinstance(cfg, Run):
            run = cfg
        else:
            run = setup_run(cfg, resume, overwrite, progress, accelerator)
        p, cfg = run.plan, run.plan.cfg
        self.cfg, self.progress, self.threads = cfg, run.progress, run.threads
        self.acc, self.group, self.engine_kind = p.acc, p.group, p.engine_kind
        self.rank, self.world = self.group.rank, self.group.world
        self.server, self.run_dir, self.resume_from = p.server, p.run_dir, p.resume_from
        self.out = p.run_dir.path
        self.task, self.test_examples, self.tokenizer = p.task, p.test_examples, p.tokenizer
        self.vocab_size = p.vocab_size
        self.student, self.teacher, self.engine = run.student, run.teacher, run.engine
        self.opt, self.sched, self.sampler = run.engine.opt, run.sched, run.sampler
        self.score_kw, self.loss_kw = run.score_kw, run.loss_kw
        self.prompts, self.tagger, self.evaluator = run.prompts, run.tagger, run.evaluator
        self.stop_requested: str | None = None  # the signal's name, once one came
        self.finished = p.finished  # a resumed run that already finished: its summary
        self.kl_kinds: dict[str, float] = {}  # the last held-out KL split by position kind
        state = run.state or {"step": 0, "tokens_trained": 0}
        self.step = state["step"]
        self.kept_share: float | None = state.get("kept_share")  # train.grad_pass "auto"
        self.nonfinite_in_row = 0
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.tokens_trained = state["tokens_trained"]
        self.history: dict[str, Any] = state.get("history", {})
        self._saved_step = self.step if self.resume_from is not None else None  # on disk
        self.trackers = Trackers.start(  # train.report_to, on the main process
            cfg.train, self.out, cfg.model_dump(mode="json"),
            self.group.is_main and self.finished is None, resume=self.resume_from is not None,
        )  # fmt: skip

    def render(self, question: str) -> str:
        cfg = self.cfg.task
        return render_prompt(self.tokenizer, question, cfg.system_prompt, cfg.chat_template)

    # ----------------------------------------------------------------------------- step
    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step: rollout → teacher → signals → select → selective-head loss →
        backward → optimizer step → metrics. Returns the metrics (None: nothing to train)."""
        step, clock = self.step + 1, PhaseClock(self.acc.device)
        with self.engine.whole():  # FSDP: until the backward reshards; ZeRO-3: the whole pass
            roll = self._rollout(step)
            if roll is None:  # a rank has no prompt left (all too long): every rank skips
                self.step = step
                return None
            clock.lap("rollout")
            tokens, valid = roll.response_ids, roll.response_mask[:, roll.prompt_len :]
            chunks, n_passes = micro_batches(len(roll), self.cfg.train.micro_batch_size, self.group)
            teacher = self.teacher.view(roll, chunks)
            clock.lap("teacher")
            kept = kept_pass(self.cfg.train.grad_pass, self.kept_share)
            h_s, h_grad = student_hidden(self.engine, self.student, roll, chunks, n_passes, kept)
            clock.lap("student_forward")
            sig = score_rollout(roll, h_s, lm_head(self.student), teacher, **self.score_kw)
            clock.lap("scoring")
            mask, normalizer, weights = select_batch(sig, valid, step, self.cfg, self.group)
            self.kept_share = kept_share(mask, roll, self.group)
            clock.lap("selection")
            loss = 0.0
            for i in range(n_passes):  # every rank runs as many; extra ones are zero-loss
                rows, cols, h, live = pass_input(self.engine, roll, mask, chunks, i, h_grad)
                clock.lap("student_forward")
                w_s = lm_head(self.student)  # after a re-gather (FSDP), the whole weight again
                if live:
                    part = selective_head_loss(
                        h, w_s, mask[rows][:, :cols], tokens=tokens[rows][:, :cols],
                        normalizer=normalizer, **teacher.loss_inputs(rows, cols), **self.loss_kw,
                        token_weights=None if weights is None else weights[rows][:, :cols],
                    )  # fmt: skip
                else:  # padding pass: zero gradients, same collectives
                    part = (h.sum() + w_s.sum()) * 0.0
                clock.lap("loss")
                self.engine.backward(part, last=i == n_passes - 1)
                loss += float(part.detach())
                clock.lap("backward")
        grad_norm, applied = self.engine.step(loss, self.cfg.optim.grad_clip)
        self.sched.step()
        clock.lap("optimizer")
        self.step = step
        out = StepPass(roll, sig, mask, h_s, teacher, loss, clock, weights)
        return self._step_metrics(out, grad_norm, applied)

    def _rollout(self, step: int) -> Rollout | None:
        """Student rollouts of this rank's share of the next batch (None on every rank when a
        rank has no prompt left after the length limit)."""
        prompts = self.prompts.next_prompts(self.cfg.train.batch_size)
        seed = seeds.rollout(self.cfg.train.seed, step, self.rank)
        roll = self._sample(prompts, seed) if prompts else None
        if self.world > 1 and self.group.all_reduce_sum(float(roll is None)) > 0:
            return None
        return roll

    def _sample(self, prompts: list[str], seed: int) -> Rollout:
        """Student rollouts with the configured sampling settings (rollout.*)."""
        ro = self.cfg.rollout
        return self.sampler(
            self.acc.unwrap_model(self.student), self.tokenizer, prompts,
            max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
            greedy=ro.greedy, seed=seed,
        )  # fmt: skip

    def _step_metrics(self, out: StepPass, grad_norm: float, applied: bool) -> dict[str, Any]:
        """Count the step, log-ready metrics, samples; stop after too many non-finite steps."""
        cfg, step, group = self.cfg, self.step, self.group
        valid = out.roll.response_mask[:, out.roll.prompt_len :]
        metrics: dict[str, Any] = {"step": step}
        if applied:
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            metrics["skipped_nonfinite"] = True
        n_sel = group.all_reduce_sum(int(out.mask.sum()))
        self.tokens_trained += int(n_sel) if applied else 0
        elapsed = time.perf_counter() - out.clock.start
        metrics.update(signal_metrics(out.sig, valid, out.mask, self.teacher.full_distribution))
        if out.weights is not None:
            full = self.teacher.full_distribution
            metrics.update(weight_metrics(out.sig, valid, out.weights, full))
        tags = self.tagger(out.roll.response_ids, valid)
        metrics.update(kind_metrics(out.sig, valid, out.mask, tags))
        n_valid = group.all_reduce_sum(int(valid.sum()))
        metrics.update(
            loss=group.all_reduce_sum(out.loss),  # each rank's share is globally normalized
            grad_norm=grad_norm,
            lr=self.sched.get_last_lr()[0],
            n_selected=int(n_sel),
            n_valid=int(n_valid),
            tokens_trained=self.tokens_trained,
            response_length=float(valid.sum(-1).float().mean()),
            **{f"{phase}_seconds": s for phase, s in out.clock.seconds.items()},
            **{f"{phase}_share": s / elapsed for phase, s in out.clock.seconds.items()},
            kept_region_share=self.kept_share,
            step_seconds=elapsed,
            tokens_per_second=n_valid / elapsed,
            nonfinite_steps=self.nonfinite_total,
        )
        metrics["selected_fraction"] = metrics["n_selected"] / max(1, metrics["n_valid"])
        if cfg.train.samples_every and step % cfg.train.samples_every == 0:
            with self.engine.whole():
                self._write_samples(out, tags)
        if self.nonfinite_in_row >= cfg.train.max_nonfinite_steps:
            self.log(metrics)  # the run stops here: still record the skipped step
            ckpt = latest_checkpoint(self.run_dir.checkpoints)
            kept = f"the last checkpoint, {ckpt}, is kept" if ckpt else "no checkpoint was saved"
            raise TrainingError(
                f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient "
                f"(step {step}); stopping. Skipped steps change no weights and {kept}: lower "
                "optim.lr, check the teacher and the data, then --resume"
            )
        return metrics

    def _write_samples(self, out: StepPass, tags: Tensor | None) -> None:
        """Append two rollouts of this step to samples.jsonl (the report's token view), each
        with its reference answer and whether the task scores it correct."""
        if not self.group.is_main:
            return
        lines = token_samples(
            self.tokenizer,
            out.roll,
            out.sig,
            out.mask,
            out.h_s,
            w_s=lm_head(self.student),
            vocab_size=self.vocab_size,
            step=self.step,
            rows=2,
            **out.teacher.sample_inputs(),
            tags=tags,  # the step's position kinds, tagged once for its metrics
        )
        for line, ex, text in zip(lines, self.prompts.last_examples, out.roll.texts, strict=False):
            line["answer"] = ex.answer  # each rollout graded as the evaluation grades
            line["correct"] = is_correct(self.task.score(text, ex))
        self.run_dir.append("samples.jsonl", lines)

    # ----------------------------------------------------------------------------- eval
    def evaluate(self, model: torch.nn.Module | None = None) -> float | None:
        """Greedy accuracy on the eval split (every rank evaluates its share; reduced); None
        when `eval.accuracy` is off."""
        if not self.cfg.eval.accuracy:
            return None
        if model is not None:
            return self.evaluator.accuracy(model)
        with self.engine.whole():
            return self.evaluator.accuracy(self.acc.unwrap_model(self.student))

    def heldout_kl(self) -> float | None:
        """Mean KL(p_S‖p_T) over the held-out bank (evaluate.py)."""
        if not self.evaluator.measures_heldout_kl(self.teacher):
            return None
        with self.engine.whole():
            bank = self.evaluator.heldout_bank(self.out / "heldout_bank.pt", self._sample)
            student = self.acc.unwrap_model(self.student)
            kinds = self.evaluator.heldout_kl_kinds(
                student, self.teacher, bank, self.vocab_size, self.tagger
            )
        self.kl_kinds = {k: v for k, v in kinds.items() if k != "heldout_kl"}
        return kinds["heldout_kl"]

    # ----------------------------------------------------------------------------- state
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            **self.prompts.state(),
            "scheduler": self.sched.state_dict(),
            "rng": rng_state(),
            "tokens_trained": self.tokens_trained,
            "nonfinite_total": self.nonfinite_total,
            "kept_share": self.kept_share,  # train.grad_pass "auto": the next step's choice
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
        state = self._trainer_state() if self.group.is_main else {}
        weights, state["optimizer"] = self.engine.full_state()  # sharded: every rank takes part
        state["optimizer_format"] = self.engine.optimizer_format
        if self.group.is_main:
            model = self.acc.unwrap_model(self.student)

            def save_model(d: Path) -> None:
                model.save_pretrained(d, safe_serialization=True, state_dict=weights)
                self.tokenizer.save_pretrained(d)

            path = save_checkpoint(
                self.run_dir.checkpoints,
                self.step,
                save_model,
                state,
                keep_last=self.cfg.train.keep_last,
            )
        self.group.wait()
        self._saved_step = self.step
        return path

    def log(self, metrics: dict[str, Any]) -> None:
        """Append a step's metrics to metrics.jsonl (and the trackers of train.report_to)."""
        self.run_dir.append("metrics.jsonl", [metrics])
        self.trackers.log(metrics, metrics["step"])

    # ----------------------------------------------------------------------------- run
    def _on_signal(self, signum: int, frame: Any) -> None:
        """First SIGINT/SIGTERM: finish the step, save, stop. A second one: quit at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = signal.Signals(signum).name
        if self.acc.is_main_process:
            print(
                f"\ntaopd: {signal.Signals(signum).name}: stopping after this step and saving a "
                "checkpoint (send it again to quit without saving)",
                file=sys.stderr,
                flush=True,
            )

    def run(self) -> dict[str, Any]:
        """Train `train.steps` steps with evaluation and checkpoints; return the summary.

        A stop signal ends it after the current step, saved, with `RunStopped`; a resumed run
        that already finished returns its summary.json as it is."""
        if self.finished is not None:
            self.close()
            return say_finished(self.out, self.finished, self.group.is_main)
        # wall time survives resume: the time up to the last checkpoint is kept in its history
        self._clock = (time.perf_counter(), self.history.get("wall_seconds", 0.0))
        old_handlers = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                old_handlers[s] = signal.signal(s, self._on_signal)
        try:
            with self._peer_loss():
                self._evaluate_before()
                self._train_loop()
            if self.stop_requested:  # a step just saved (save_every) is not saved again
                if self._saved_step != self.step:
                    self.save()
                saved = latest_checkpoint(self.run_dir.checkpoints)
                raise RunStopped(self.stop_requested, self.step, saved, self.out)
            summary = self._finish()
        finally:
            for s, old in old_handlers.items():
                signal.signal(s, old)
            self.trackers.finish()
            self.close()
        return summary

    @contextlib.contextmanager
    def _peer_loss(self) -> Iterator[None]:
        """A collective that fails (a process died) or times out (one hangs): one clear line."""
        try:
            yield
        except RuntimeError as e:
            timeout = self.cfg.train.collective_timeout_s
            if (why := lost_peer(e, self.group, self.step + 1, timeout, self.out)) is None:
                raise
            raise TrainingError(why) from None

    def _evaluate_before(self) -> None:
        """Teacher and initial student accuracy and held-out KL (once; kept across resumes)."""
        h = self.history
        if "teacher_accuracy" not in h and self.cfg.train.eval_teacher and self.cfg.eval.accuracy:
            h["teacher_accuracy"] = self.teacher.accuracy(self.evaluator)
        if "student_accuracy_before" not in h and self.cfg.train.eval_before:
            h["student_accuracy_before"] = self.evaluate()
        if "heldout_kl_before" not in h:
            h["heldout_kl_before"] = self.heldout_kl()
            h.update({f"{k}_before": v for k, v in self.kl_kinds.items()})
        h.setdefault("selected_fractions", [])
        h.setdefault("accuracy_curve", [])

    def _train_loop(self) -> None:
        """Steps until train.steps or a stop signal, evaluating, logging and saving as set."""
        cfg, h = self.cfg, self.history
        strategy = cfg.selection.strategy
        bar = tqdm(
            total=cfg.train.steps,
            initial=self.step,
            desc="TA-OPD" if strategy == "teachability" else f"OPD ({strategy})",
            disable=not (self.progress and self.group.is_main),
        )
        while self.step < cfg.train.steps and not self.stop_requested:
            try:
                metrics = self.train_step()
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if (oom := out_of_memory(e, self.step + 1, self.out)) is None:
                    raise
                raise TrainingError(oom) from None
            if metrics is not None:  # None: every prompt of the batch was skipped (too long)
                h["selected_fractions"].append(metrics["selected_fraction"])
                last = self.step == cfg.train.steps
                if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or last):
                    metrics["accuracy"] = self.evaluate()
                    metrics["heldout_kl"] = self.heldout_kl()
                    metrics.update(self.kl_kinds)
                    h.update(self.kl_kinds)
                    h["accuracy_curve"].append(
                        [self.step, self.tokens_trained, metrics["accuracy"], metrics["heldout_kl"]]
                    )
                self.log(metrics)
            bar.update(1)
            if metrics is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", kept=metrics["n_selected"])
            if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                self.save()
        bar.close()

    def _finish(self) -> dict[str, Any]:
        """Final evaluation (unless the last step had one), last checkpoint, summary.json."""
        h = self.history
        if h["accuracy_curve"] and h["accuracy_curve"][-1][0] == self.step:
            _, _, after, kl_after = h["accuracy_curve"][-1]
        else:
            after, kl_after = self.evaluate(), self.heldout_kl()
            h.update(self.kl_kinds)
        summary = run_summary(self, after, kl_after, self._wall_seconds())
        if self._saved_step != self.step:
            self.save()  # the final weights (unless the last step was just saved)
        self.run_dir.write_summary(summary)
        return summary

    def close(self) -> None:
        """Let go of the run folder (its lock), e.g. for another trainer in this process."""
        run_dir = getattr(self, "run_dir", None)
        if run_dir is not None:
            run_dir.close()
        server = getattr(self, "server", None)
        if server is not None:
            server.close()


def setup_run(
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    accelerator: Any | None = None,
) -> Run:
    """A run's setup in its three phases (setup.py): check every input, claim the run folder,
    build; torch's threads are set once the checks pass, the models load with this module's
    `load_model` and the sampler is this module's `make_sampler`."""
    plan = check(cfg, resume, overwrite, accelerator)
    threads = set_threads(cfg.train.threads, plan.acc.device)
    try:
        claim(plan)
        return build(plan, threads, progress, Loaders(load_model, make_sampler))
    except BaseException:
        plan.close()
        raise


def train(
    cfg: Config, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Build a Trainer and run it; returns the summary dict (also in output_dir/summary.json).

    `resume` of a run that already finished at train.steps returns its summary.json, saying so,
    without loading a model (raise train.steps to train it further)."""
    if resume and not overwrite and (done := finished_run(cfg)) is not None:
        return done
    return Trainer(cfg, resume=resume, overwrite=overwrite, progress=progress).run()

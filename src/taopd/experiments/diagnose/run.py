"""`taopd diagnose`: bank → θ0 signals → update → gains → statistics → outputs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from ...config import Config, training_only
from ...data import size_notice
from ...errors import UserError, notice
from ...models import load_tokenizer
from ...training.run_dir import check_diagnose_output, write_marker
from ...training.trackers import Trackers, check_trackers
from .bank import BANK_FILE, Models, bank_meta, bank_samples, load_bank, make_bank, save_bank
from .bank import score_bank as _score_bank
from .gains import opd_gains, opd_update, single_step_gains
from .outputs import position_columns, write_positions, write_results, write_samples
from .statistics import REGRESSION_TERMS, Analysis, analyse, topn_by_kind

if TYPE_CHECKING:
    from ...core.scores import TokenSignals
    from ...training.rollout import Rollout

__all__ = ["run_diagnose"]


def run_diagnose(
    cfg: Config,
    mode: str | None = None,
    bank_path: str | Path | None = None,
    relative: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the fixed-context diagnostic of `cfg` into `cfg.output_dir`; returns the summary.

    `mode` ('opd' / 'single-step') and `relative` override `cfg.diagnose`; `bank_path` reuses
    a saved bank instead of sampling one.
    """
    from ...reports.report import render_report
    from ...training.train import Trainer

    start = time.perf_counter()
    dcfg, out, loaded = _prepare(cfg, mode, relative, overwrite, bank_path)
    trainer = Trainer(_update_config(cfg, out), overwrite=True, progress=progress)
    write_marker(out, "diagnose")
    (out / "config.yaml").write_text(cfg.model_copy(update={"diagnose": dcfg}).to_yaml())
    models = Models(trainer.student, trainer.teacher.model, trainer.tokenizer, trainer.vocab_size)
    sample = (trainer.task, trainer.render, trainer.sampler)
    bank, meta = _bank(sample, models, cfg, dcfg, loaded, progress)
    save_bank(out / BANK_FILE, bank, meta.pop("prompts"), meta)
    valid = bank.response_mask[:, bank.prompt_len :]
    if not bool(valid.any()):
        raise UserError("the bank has no response tokens (every rollout ended at once)")
    teacher_cache: list[Tensor] = []

    def score(desc: str) -> Any:  # the bank's signals under the student's current weights
        return _score_bank(
            models.student, models.teacher, bank, models.vocab_size, k=cfg.selection.k,
            batch_size=dcfg.batch_size, chunk_size=cfg.selection.chunk_size,
            teacher_cache=teacher_cache, desc=desc, progress=progress,
        )  # fmt: skip

    sig0 = score("bank: scoring θ0")
    kl0 = sig0.forward_kl.double().numpy()
    samples = bank_samples(models, bank, sig0)
    gains, info = _gains(trainer, (models, bank, sig0, teacher_cache), score, cfg, dcfg, out)
    tags = trainer.tagger(bank.response_ids, valid)  # planted-style positions, or None
    columns, raw = position_columns(
        bank, sig0, kl0, gains, trainer.tokenizer, dcfg.divergence, tags
    )
    write_positions(out / "positions.csv", columns)
    write_samples(out / "samples.jsonl", samples, gains["gain"], valid)
    analysis = analyse(columns, raw, dcfg, progress)
    summary = _summary(cfg, dcfg, trainer.teacher.label, bank, meta, columns, analysis, info)
    write_results(out, summary, analysis, start)
    if "kind" in columns:  # planted-style positions: the selections split by position kind
        _write_kinds(out, columns, analysis, dcfg)
    log_to_trackers(cfg, out, summary, analysis)
    render_report(out)
    summary["output_dir"] = str(out)
    return summary


def log_to_trackers(cfg: Config, out: Path, summary: dict[str, Any], a: Analysis) -> None:
    """The diagnostic's result, once, to the trackers of train.report_to (one tracker run named
    after `out`): the matched top-N table (`matched_topn`: a table in wandb, and the scalars
    `matched_topn/<selector>@<ratio>/<stat>` everywhere) and the summary's numbers at step 0."""
    trackers = Trackers.start(cfg.train, out, cfg.model_dump(mode="json"))
    try:
        stats = ("n", "mean", "low", "high", "lift", "share_of_gain", "q3_fraction")
        rows = [
            [f"{sel}@{r}", sel, str(r), *(e.get(k) for k in stats)]
            for sel, per in a.topn.items()
            for r, e in per.items()
        ]
        trackers.log_table("matched_topn", ["arm", "selector", "ratio", *stats], rows)
        trackers.log({f"summary/{k}": v for k, v in summary.items()}, step=0)
    finally:
        trackers.finish()


def _gains(
    trainer: Any,
    scored: tuple[Models, Rollout, TokenSignals, list[Tensor]],
    score: Callable[[str], Any],
    cfg: Config,
    dcfg: Any,
    out: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each position's gain under diagnose.mode: the bank's KL after a short OPD run
    (`opd`; its student saved if asked), or one SGD step per sampled position (`single-step`);
    and what the mode reports of itself."""
    models, bank, sig0, teacher_cache = scored
    progress = trainer.progress
    kl0 = sig0.forward_kl.double().numpy()
    if dcfg.mode == "opd":
        info = opd_update(trainer, progress)
        gains = opd_gains(kl0, score("bank: scoring θτ").forward_kl.double().numpy(), dcfg.relative)
        if dcfg.save_student:
            student = trainer.acc.unwrap_model(trainer.student)
            student.save_pretrained(out / "update" / "student", safe_serialization=True)
            trainer.tokenizer.save_pretrained(out / "update" / "student")
    else:
        chunks = (cfg.selection.chunk_size, cfg.loss.chunk_size)
        gains = single_step_gains(models, bank, sig0, teacher_cache, dcfg, chunks, progress)
        info = {"single_lr": dcfg.single_lr, "n_single": dcfg.n_single}
    return gains, info


def _prepare(
    cfg: Config,
    mode: str | None,
    relative: bool | None,
    overwrite: bool,
    bank_path: str | Path | None,
) -> tuple[Any, Path, Any]:
    """Check the request, the output folder and a given bank (loaded: returned), before any
    model or file is touched."""
    if cfg.teacher_server is not None:
        raise UserError(
            "diagnose measures full-vocabulary KL gains and needs the teacher's weights; "
            "teacher_server is not supported there: drop it and point `teacher` at the model"
        )
    dcfg = cfg.diagnose.model_copy(
        update={k: v for k, v in (("mode", mode), ("relative", relative)) if v is not None}
    )
    if dcfg.mode not in ("opd", "single-step"):
        raise UserError(f"mode must be 'opd' or 'single-step', got {dcfg.mode!r}")
    out = Path(cfg.output_dir)
    check_diagnose_output(out, overwrite)
    check_trackers(cfg.train)  # train.report_to: a missing package, before any work
    loaded = load_bank(bank_path) if bank_path is not None else None
    if loaded is not None and int(loaded[0].input_ids.max()) >= len(load_tokenizer(cfg.student)):
        raise UserError(f"bank {bank_path} holds token ids beyond this tokenizer's vocabulary")
    return dcfg, out, (bank_path, loaded)


def _bank(
    sample: tuple[Any, Any, Any],
    models: Models,
    cfg: Config,
    dcfg: Any,
    loaded: Any,
    progress: bool,
) -> tuple[Any, dict[str, Any]]:
    """The bank: `loaded` (its path, (rollout, prompts, meta)) or sampled from the θ0 student on
    test prompts (`sample`: the task, its prompt renderer, the sampler). Returns it and its
    meta, with the prompts under "prompts"."""
    max_new = dcfg.max_new_tokens or cfg.rollout.max_new_tokens
    bank_path, given = loaded
    if given is not None:
        bank, prompts, meta = given
        if int(bank.input_ids.max()) >= models.vocab_size:
            raise UserError(f"bank {bank_path} holds token ids beyond this tokenizer's vocabulary")
    else:
        task, render, sampler = sample
        examples = task.examples("test", dcfg.n_contexts, seed=cfg.task.seed)
        if not examples:
            raise UserError("the task gave no test examples for the bank")
        key = "diagnose.n_contexts"
        if cut := size_notice(task, "test", dcfg.n_contexts, len(examples), key):
            notice(cut)
        prompts = [render(ex.question) for ex in examples]
        bank = make_bank(
            sampler, models.student, models.tokenizer, prompts, max_new,
            dcfg.batch_size, dcfg.seed, progress,
        )  # fmt: skip
        meta = bank_meta(cfg, examples, max_new, dcfg.seed)
    return bank, {**meta, "prompts": prompts}


def _summary(
    cfg: Config,
    dcfg: Any,
    teacher: str,
    bank: Any,
    meta: dict[str, Any],
    columns: dict[str, Any],
    a: Analysis,
    info: dict[str, Any],
) -> dict[str, Any]:
    kl0 = columns["kl0"]
    summary: dict[str, Any] = {
        "mode": dcfg.mode,
        "relative": dcfg.relative,
        "student": cfg.student,
        "teacher": str(teacher),
        "task": cfg.task.name or cfg.task.path,
        "n_contexts": len(bank),
        "max_new_tokens": int(
            meta.get("max_new_tokens", dcfg.max_new_tokens or cfg.rollout.max_new_tokens)
        ),
        "n_positions": len(kl0),
        "n_analysed": int(a.keep.sum()),
        "kl0_mean": float(kl0.mean()),
        "gain_mean": float(a.gain.mean()),
        "gain_positive_share": float((a.gain > 0).mean()),
        "gain_kind": a.primary,
        "winsorize": dcfg.winsorize,
        "divergence": dcfg.divergence,
        "gain_absolute_mean": float(np.nanmean(columns["gain_absolute"][a.keep])),
        "gain_relative_mean_winsorized": float(a.gains["relative"].mean()),
        "bootstrap": dcfg.bootstrap,
        **info,
        "r2": a.r2,
        f"r2_{a.other}": a.r2_other,
        "regression_terms": {m: cols for m, cols in a.models.items()},
        "term_meanings": REGRESSION_TERMS,
    }
    if dcfg.mode == "opd":
        summary["kl_tau_mean"] = float(columns["kl_tau"].mean())
    return summary


def _update_config(cfg: Config, out: Path) -> Config:
    """The trainer's config: the diagnose config with its update strategy, no evaluation."""
    data = training_only(cfg, out / "update")
    if cfg.diagnose.update_strategy is not None:
        data["selection"]["strategy"] = cfg.diagnose.update_strategy
    d = cfg.diagnose
    for value, section, key in (
        (d.update_lr, "optim", "lr"),
        (d.update_steps, "train", "steps"),
        (d.update_batch_size, "train", "batch_size"),
    ):
        if value is not None:
            data[section][key] = value
    return Config.model_validate(data)


def _write_kinds(out: Path, columns: dict[str, Any], a: Analysis, dcfg: Any) -> None:
    """matched_topn_by_kind.json and a section of diagnose.md: which kind each selector keeps
    and what the kept positions of each kind gained."""
    import json

    kinds = np.asarray(columns["kind"])[a.keep]
    split = topn_by_kind(a.table, a.gain, kinds, dcfg.selectors, dcfg.ratios, dcfg.seed)
    (out / "matched_topn_by_kind.json").write_text(json.dumps(split, indent=2))
    bank = split["bank"]

    def f(x: float | None, pct: bool = False) -> str:
        return "n/a" if x is None else (f"{100 * x:.1f}%" if pct else f"{x:.4f}")

    lines = [
        "",
        f"## Split by position kind ({a.primary} gain)",
        "",
        f"Planted-style positions: {f(bank['style_share'], True)} of the bank; mean gain "
        f"{f(bank['style'])} there, {f(bank['other'])} elsewhere.",
        "",
        "| selector | ratio | kept | style share of kept | gain, kept style | gain, kept other |",
        "|---|---|---|---|---|---|",
    ]
    for sel in dcfg.selectors:
        for r, c in split[sel].items():
            lines.append(
                f"| {sel} | {r} | {c['n']} | {f(c['style_share'], True)} | "
                f"{f(c['gain_style'])} | {f(c['gain_other'])} |"
            )
    with open(out / "diagnose.md", "a") as fh:
        fh.write("\n".join(lines) + "\n")

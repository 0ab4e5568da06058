"""Typed, validated run configs: YAML recipes plus `--set key.sub=value` overrides.

Unknown keys and bad values are reported together in one `UserError` naming each field (the
reading and the wording: `config_io.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .config_io import (
    apply_overrides,
    format_errors,
    list_recipes,
    override_keys,
    read_config_file,
    recipe_path,
    resolve_paths,
)
from .errors import UserError

__all__ = ["Config", "load_config", "apply_overrides", "recipe_path", "list_recipes"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StyleCfg(_Strict):
    """A teacher style planted in the worked solutions the model is fine-tuned on (the `mismatch`
    recipe): `marker` written at `where` on every `every`-th step line; the final '#### answer'
    line is never marked, so both styles stay scorable."""

    marker: str = Field("» ", min_length=1)  # text the teacher writes and the student never does
    # "line": at the start of a step line; "result": after its '=', before the partial result
    where: Literal["line", "result"] = "line"
    every: int = Field(1, ge=1)  # mark step lines 0, every, 2·every, ...


class TeacherSFT(_Strict):
    """Fine-tune a model on the task's train split before distilling (cached by content): the
    teacher (`teacher_sft`), or the student as a warm start on the answer format (`student_sft`)."""

    steps: int = Field(60, ge=1)  # AdamW steps of the fine-tune
    batch_size: int = Field(16, ge=1)  # train-split examples per step (cycled in a seeded order)
    lr: float = Field(5e-5, gt=0)  # AdamW learning rate (no weight decay, no schedule)
    seed: int = 0  # torch seed of the fine-tune and of its example order
    # worked solutions in another style (task.solution: worked only); None: the task's own format
    style: StyleCfg | None = None

    def cache_fields(self) -> dict[str, Any]:
        """What determines the fine-tune (no `style` key when unset: older cache keys hold)."""
        return self.model_dump(exclude={"style"} if self.style is None else set())


class TaskCfg(_Strict):
    """A reasoning-gym task by `name` (+ `params`) or a local JSONL/JSON/parquet file by `path`."""

    name: str | None = "chain_sum"  # reasoning-gym task name (ignored when `path` is set)
    params: dict[str, Any] = Field(default_factory=dict)  # the reasoning-gym task's own options
    # a local .jsonl/.json/.parquet file of records (a "split" field, else a hash of the prompt,
    # picks train or test); replaces `name`. Relative in a config file: to its folder, else to
    # the working directory
    path: str | None = None
    prompt_field: str = "question"  # file task: the record field holding the question
    answer_field: str = "answer"  # file task: the record field holding the reference answer
    n_train: int = Field(2000, ge=1)  # training examples drawn (the prompt stream cycles them)
    n_test: int = Field(200, ge=1)  # evaluation examples (of eval.split) for accuracy and KL
    seed: int = 0  # which examples are drawn and their order (also keys the fine-tune caches)
    system_prompt: str | None = None  # a system message before every question; None: none
    chat_template: bool = True  # render prompts with the tokenizer's chat template (else q + "\n")
    prompt_suffix: str = ""  # an instruction appended to every question ('' = none)
    # fine-tuning target: "answer" (the bare answer) or "worked" (a worked solution ending in
    # '#### answer'; chain_sum only); evaluation always scores the final answer
    solution: Literal["answer", "worked"] = "answer"
    # a relative `path` of a config file found neither beside it nor in the working directory:
    # where it was looked for (load_config), for the error
    _looked_for: str = PrivateAttr("")

    @model_validator(mode="after")
    def _one_source(self) -> TaskCfg:
        if self.path is not None:
            self.__dict__["name"] = None
        if self.name is None and self.path is None:
            raise ValueError("give task.name (a reasoning-gym task) or task.path (a data file)")
        return self

    def as_task_dict(self) -> dict[str, Any]:
        """The task's `make_task` dict; a file path of the config found nowhere is refused here,
        naming where it was looked for."""
        if self.path is not None:
            if self._looked_for and not Path(self.path).expanduser().exists():
                raise UserError(f"task file {self.path} does not exist{self._looked_for}")
            return {
                "path": self.path,
                "prompt_field": self.prompt_field,
                "answer_field": self.answer_field,
            }
        out: dict[str, Any] = {"name": self.name, "params": dict(self.params)}
        if self.solution != "answer":  # absent by default: keeps the demo's teacher cache key
            out["solution"] = self.solution
        return out


class VLLMCfg(_Strict):
    """Engine knobs of `rollout.backend: vllm` (one engine colocated on the trainer's GPU)."""

    # share of the GPU's total memory the engine may take (weights + KV cache); the rest stays
    # with the trainer's student, teacher and optimizer
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    # engine weights and activations; "auto" = the student's dtype (train.dtype), so rollouts
    # follow the distribution HF generate would sample
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # True: no CUDA graphs (faster start, less memory, slower decoding)
    enforce_eager: bool = False
    # longest prompt + response the engine accepts; None = the model's context length
    max_model_len: int | None = Field(None, ge=1)


class RolloutCfg(_Strict):
    """How the student samples its training rollouts (on-policy responses to the prompts)."""

    backend: Literal["hf", "vllm"] = "hf"  # "hf": transformers generate; "vllm": a vLLM engine
    max_new_tokens: int = Field(6, ge=1)  # response length cap of a training rollout, in tokens
    temperature: float = Field(1.0, gt=0)  # sampling temperature (1: the student's distribution)
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling mass (1: the whole vocabulary)
    greedy: bool = False  # argmax rollouts (deterministic; for checks, not for training)
    max_prompt_tokens: int = Field(512, ge=1)  # longest rendered prompt, in tokens (see overflow)
    # a longer prompt: "truncate" keeps its last max_prompt_tokens tokens, "skip" drops it
    # (both counted in summary.json)
    prompt_overflow: Literal["truncate", "skip"] = "truncate"
    vllm: VLLMCfg = Field(default_factory=VLLMCfg)  # used when backend is "vllm"

    @model_validator(mode="after")
    def _vllm_fits(self) -> RolloutCfg:
        cap = self.vllm.max_model_len
        need = self.max_prompt_tokens + self.max_new_tokens
        if self.backend == "vllm" and cap is not None and cap < need:
            raise ValueError(
                f"vllm.max_model_len ({cap}) must be >= max_prompt_tokens + max_new_tokens ({need})"
            )
        return self


class SelectionCfg(_Strict):
    """Which response positions the loss keeps: a strategy's scores, top share `ratio`."""

    # how positions are ranked (core/selection.py STRATEGIES; "full" keeps all, "teachability"
    # is TA-OPD)
    strategy: str = "teachability"
    ratio: float = 0.05  # share ρ of the valid response positions kept, in (0, 1]
    k: int = Field(16, ge=1)  # K of the student's and teacher's top-K supports the signals use
    # "batch": one top-n over the whole global batch (the paper); "sequence": top-n per rollout
    scope: Literal["batch", "sequence"] = "batch"
    # keep at least this many positions in every non-empty rollout (1: the released code's rule)
    min_per_sequence: int = Field(0, ge=0)
    # positions projected through the vocabulary at a time while scoring (memory vs. speed)
    chunk_size: int = Field(512, ge=1)
    # precision of the scoring pass's vocabulary projections (softmaxes and sums stay float32):
    # "auto" = the models' dtype. "bfloat16" is faster where bf16 matmuls are native (GPUs, CPUs
    # with AVX512-BF16 / AMX; several times slower where emulated) but keeps a different set:
    # 90-98% of float32's kept positions on the benchmark's batches (benchmarks/README.md)
    projection_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # "select": train on the top share `ratio` (Eq. 13); "weight": train on every valid position,
    # weighted by the strategy's score (core/weights.py; needs ratio 1; "iw_opd" is weight-only)
    mode: Literal["select", "weight"] = "select"
    # weight mode: w ∝ floor + (1 − floor)·score, rescaled to mean 1 (1: full OPD; 0: score alone)
    weight_floor: float = Field(0.1, ge=0, le=1)
    iw_gamma: float = Field(0.5, ge=0)  # iw_opd: weights in [1, 1 + γ] (arXiv 2606.22600)

    @model_validator(mode="after")
    def _mode(self) -> SelectionCfg:
        from .core.weights import check_mode

        check_mode(self.strategy, self.mode, self.ratio)
        return self

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"ratio must be in (0, 1] (share of valid positions kept), got {v}")
        return v

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from .core.selection import STRATEGIES
        from .core.weights import WEIGHT_ONLY

        if v not in STRATEGIES and v not in WEIGHT_ONLY:
            names = ", ".join(sorted((*STRATEGIES, *WEIGHT_ONLY)))
            raise ValueError(f"strategy must be one of {names}; got {v!r}")
        return v


class LossCfg(_Strict):
    """The per-token distillation loss on the kept positions and how it is averaged."""

    # per-token loss: KL(p_S‖p_T), KL(p_T‖p_S), generalized JSD (`beta`), or "pg" (the
    # sampled-token policy gradient, PPO-clipped; the only one a served teacher allows)
    kind: Literal["reverse_kl", "forward_kl", "jsd", "pg"] = "reverse_kl"
    # "kept": mean over the kept positions (Eq. 7); "valid": the kept sum over all valid positions
    # (a fixed per-token weight: the loss is `kept` times kept/valid)
    normalize: Literal["kept", "valid"] = "kept"
    # "token": one mean over all kept positions (the paper); "sequence": mean per rollout, then
    # over rollouts (the released code)
    reduction: Literal["token", "sequence"] = "token"
    beta: float = Field(0.5, gt=0, lt=1)  # jsd only: teacher weight β of the mix β·p_T+(1-β)·p_S
    # softmax temperature of both models' logits, in the loss and in the selection signals
    temperature: float = Field(1.0, gt=0)
    chunk_size: int = Field(1024, ge=1)  # kept positions projected through the vocabulary at a time


class OptimCfg(_Strict):
    """The student's AdamW optimizer and learning-rate schedule (over train.steps)."""

    lr: float = Field(5e-5, gt=0)  # peak learning rate (after warmup)
    weight_decay: float = Field(0.0, ge=0)  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's (β1, β2)
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm (0: no clipping)
    # after warmup: constant, or decaying linearly / by a cosine to 0 at train.steps
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)  # steps of linear warmup from 0 to lr


class TeacherServerCfg(_Strict):
    """A teacher behind vLLM's OpenAI server: its top-k prompt log-probs replace the local teacher.

    `teacher` then names only the teacher's tokenizer (vocabulary checks); its weights are not
    loaded. Ask the server for `top_k` <= its --max-logprobs (vLLM's default is 20).
    """

    url: str  # OpenAI-compatible base URL, e.g. http://host:8000/v1
    model: str | None = None  # served model name; None = the server's only model
    top_k: int = Field(20, ge=1)  # prompt_logprobs requested per position
    timeout_s: float = Field(120.0, gt=0)  # read timeout of one request
    connect_timeout_s: float = Field(10.0, gt=0)  # seconds to open a connection to the server
    batch_size: int = Field(16, ge=1)  # sequences per HTTP request
    # a connection error, timeout, 429 or 5xx is tried again up to `retries` times, waiting
    # backoff_s * 2**(n-1) seconds (±50% jitter) before try n+1; other 4xx end the run at once
    retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0)  # the first retry's wait; doubles on each further try

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")


class LoraCfg(_Strict):
    """Train LoRA adapters on the student instead of all its weights (needs taopd[peft])."""

    r: int = Field(16, ge=1)  # rank of each adapter
    alpha: int = Field(32, ge=1)  # LoRA scaling numerator: the update is scaled by alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the adapters' input
    # module names to adapt (peft's target_modules), or "all-linear": every linear layer
    target_modules: list[str] | str = "all-linear"


TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
"""The experiment trackers `train.report_to` may name (through accelerate's tracker classes)."""


class TrainCfg(_Strict):
    """The training loop: steps, batches, precision, evaluation and checkpoint cadence, logs."""

    steps: int = Field(30, ge=1)  # optimizer steps of the run
    batch_size: int = Field(16, ge=1)  # prompts per step over all processes (one rollout each)
    # rollouts per gradient pass on each process, to bound memory; None: the process's whole share
    micro_batch_size: int | None = Field(None, ge=1)
    # the student's gradient pass. "batch": one body forward with gradient over every row, its
    # detached hidden states also feed scoring. "kept": scoring runs the body without gradient,
    # then the gradient pass covers only rows with a kept position, cut after the last kept
    # column (an extra forward of those rows, a backward of only them). "auto": "kept" when the
    # previous step's kept region was under half the batch's tokens. With micro-batches the
    # scoring pass is gradient-free anyway and the gradient passes always cover the kept region.
    grad_pass: Literal["auto", "batch", "kept"] = "auto"
    # accuracy and held-out KL every this many steps and at the last (0: only after training)
    eval_every: int = Field(0, ge=0)
    save_every: int = Field(0, ge=0)  # checkpoint every this many steps (0: only the final one)
    keep_last: int = Field(2, ge=1)  # checkpoints kept on disk (older ones are deleted)
    log_every: int = Field(1, ge=1)  # not used: every step goes to metrics.jsonl (old configs load)
    samples_every: int = Field(0, ge=0)  # token-view records to samples.jsonl every N steps (0: no)
    seed: int = 0  # the run's one seed: prompt order, rollouts, selection ties (seeds.py)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # student weights (and teacher's)
    # the teacher's weights; None: train.dtype
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # stop (keeping the last checkpoint) after this many steps in a row with a non-finite loss or
    # gradient; such steps change no weights
    max_nonfinite_steps: int = Field(3, ge=1)
    # multi-process: how long a collective waits for the other processes (one that died, or
    # hangs) before this one ends with an error instead of waiting for ever
    collective_timeout_s: float = Field(600.0, gt=0)
    eval_before: bool = True  # measure the student's accuracy before the first step
    eval_teacher: bool = True  # measure the teacher's accuracy once (needs eval.accuracy)
    # experiment trackers that also get every step's numeric metrics (metrics.jsonl is always
    # written): tensorboard (tb/ in the run folder), wandb, trackio, mlflow; [none]: none
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    tensorboard: bool = True  # kept for compatibility: false drops tensorboard from report_to
    tracker_project: str = Field("taopd", min_length=1)  # wandb/trackio project, mlflow experiment
    run_name: str | None = None  # the tracker run's name; None: the output folder's name
    # trackers' group of related runs (wandb/trackio group, mlflow tag); compare: the sweep folder
    tracker_group: str | None = None
    # torch's CPU threads; None = the cores not busy with other jobs when the run starts (its
    # cores minus the 1-minute load average): more threads than free cores stall every step
    threads: int | None = Field(None, ge=1)
    # shard the student's weights, gradients and optimizer state across processes (FSDP2); also
    # switched on by an accelerate FSDP config. The teacher stays whole on every process.
    fsdp: bool = False
    # partition the student with DeepSpeed ZeRO (stage 3 by default, or the accelerate config's
    # zero_stage); also switched on by an accelerate DeepSpeed config. Needs taopd[deepspeed].
    deepspeed: bool = False

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, v: Any) -> Any:
        """`--set train.report_to=wandb` (or `wandb,trackio`): a name is a one-item list."""
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("report_to")
    @classmethod
    def _report_to(cls, v: list[str]) -> list[str]:
        names = [x.strip().lower() for x in v]
        bad = [x for x in names if x not in (*TRACKERS, "none")]
        if bad:
            raise ValueError(
                f"unknown tracker(s) {', '.join(map(repr, bad))}; choose from "
                f"{', '.join(TRACKERS)}, or none"
            )
        if not names:
            raise ValueError("give at least one tracker, or [none] for none")
        if "none" in names and len(names) > 1:
            raise ValueError("none means no tracker: give it alone, not with others")
        return list(dict.fromkeys(names))

    def trackers(self) -> list[str]:
        """The trackers this run reports to: report_to less "none", less tensorboard when the
        old `tensorboard: false` is set."""
        return [
            x for x in self.report_to if x != "none" and (self.tensorboard or x != "tensorboard")
        ]


class EvalCfg(_Strict):
    """Evaluations: greedy accuracy on the eval split and KL(student‖teacher) on a fixed bank."""

    batch_size: int = Field(64, ge=1)  # prompts per greedy-generation batch when evaluating
    max_new_tokens: int = Field(8, ge=1)  # answer length cap of greedy evaluation, in tokens
    heldout_kl_prompts: int = Field(32, ge=0)  # fixed bank of rollouts for KL(student‖teacher)
    # the split evaluations (accuracy, held-out KL bank) draw from: "validation" is disjoint from
    # train and test (reasoning-gym tasks), for choosing settings such as the lr without the test
    split: Literal["test", "validation"] = "test"
    accuracy: bool = True  # False: no greedy-accuracy evaluations (held-out KL only; cheaper)


DIAGNOSE_SELECTORS = (
    "teachability",
    "divergence",
    "reverse_kl",
    "incompatible",
    "tip",
    "entropy",
    "compatibility",
    "random",
    "early",
)


class DiagnoseCfg(_Strict):
    """`taopd diagnose`: the fixed-context diagnostic (bank, update, per-position gains, stats)."""

    n_contexts: int = Field(100, ge=1)  # held-out prompts in the bank (one rollout each)
    max_new_tokens: int | None = Field(None, ge=1)  # None: rollout.max_new_tokens
    # "opd": a short OPD update, then every position's gain; "single-step": one SGD step per
    # sampled position (n_single of them) and its gain on the whole bank
    mode: Literal["opd", "single-step"] = "opd"
    update_strategy: str | None = "full"  # OPD update's selection.strategy (None: `selection`)
    # The OPD update, as released: a small move around θ0 (the local regime of Eq. 1 and
    # Proposition 1): Adam at lr 1e-6 for 150 steps of 2 prompts. None: optim.lr /
    # train.steps / train.batch_size (e.g. the former 8 steps of 16 at 5e-5)
    update_lr: float | None = Field(1e-6, gt=0)
    update_steps: int | None = Field(150, ge=1)  # OPD update's optimizer steps (None: train.steps)
    # prompts per step of the OPD update (None: train.batch_size)
    update_batch_size: int | None = Field(2, ge=1)
    # gain for the statistics: the released relative reduction (KL0 - KLτ) / (KL0 + 1e-12);
    # false: Eq. 1's absolute KL0 - KLτ (both are always written and tabled)
    relative: bool = True
    winsorize: float = Field(0.01, ge=0, lt=0.5)  # gains clipped at these quantiles (1/99)
    # D of the analysis: "forward_kl" = full-vocabulary KL(p_T‖p_θ0) (released), "union" =
    # Eq. 9's union KL that training uses
    divergence: Literal["forward_kl", "union"] = "forward_kl"
    split_interaction: bool = False  # also fit the split model with H̃·D̃ ("split+H*D")
    n_single: int = Field(16, ge=0)  # single-step: positions updated one at a time (0: all)
    single_lr: float = Field(1e-5, gt=0)  # single-step: SGD step size η (keep η‖∇ℓ_t‖² ≪ ℓ_t)
    # kept shares ρ at which every selector's matched top-N gain is measured
    ratios: list[float] = Field(default_factory=lambda: [0.03, 0.05, 0.1])
    # the strategies compared in the statistics (names of core/selection.py STRATEGIES)
    selectors: list[str] = Field(default_factory=lambda: list(DIAGNOSE_SELECTORS))
    bootstrap: int = Field(1000, ge=0)  # prompt-clustered bootstrap draws
    batch_size: int = Field(32, ge=1)  # contexts per forward pass when sampling / scoring
    seed: int = 0  # the bank's rollouts, single-step's positions, the bootstrap and selection ties
    save_student: bool = False  # also save θτ (OPD mode) under update/student

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 < r <= 1.0 for r in v):
            raise ValueError(f"ratios must be a non-empty list of values in (0, 1], got {v}")
        return v

    @field_validator("selectors")
    @classmethod
    def _selectors(cls, v: list[str]) -> list[str]:
        from .core.selection import STRATEGIES

        bad = [s for s in v if s not in STRATEGIES]
        if bad or not v:
            raise ValueError(f"selectors must be among {', '.join(sorted(STRATEGIES))}; got {bad}")
        return v

    @field_validator("update_strategy")
    @classmethod
    def _update_strategy(cls, v: str | None) -> str | None:
        from .core.selection import STRATEGIES

        if v is not None and v not in STRATEGIES:
            raise ValueError(
                f"update_strategy must be one of {', '.join(sorted(STRATEGIES))}; got {v!r}"
            )
        return v


class Config(_Strict):
    """One run: models, task, rollout, selection, loss, optimizer, loop, evaluation, output."""

    # the model trained: "smollm2" (the bundled SmolLM2-135M-Instruct), an HF folder (relative in
    # a config file: to its folder, else to the working directory) or a hub id
    student: str = "smollm2"
    # the model distilled from (same naming; with teacher_server only its tokenizer is loaded);
    # not the student itself (refused: nothing would train) unless teacher_sft fine-tunes it
    teacher: str = "smollm2"
    teacher_sft: TeacherSFT | None = None
    student_sft: TeacherSFT | None = None  # warm start: the student fine-tuned on the format
    teacher_server: TeacherServerCfg | None = None
    task: TaskCfg = Field(default_factory=TaskCfg)
    rollout: RolloutCfg = Field(default_factory=RolloutCfg)
    selection: SelectionCfg = Field(default_factory=SelectionCfg)
    loss: LossCfg = Field(default_factory=LossCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    lora: LoraCfg | None = None
    train: TrainCfg = Field(default_factory=TrainCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    diagnose: DiagnoseCfg = Field(default_factory=DiagnoseCfg)
    # the run folder (config, logs, checkpoints, summary); relative to the working directory
    output_dir: str = "runs/run"
    # student/teacher folders of a config file found nowhere: where they were looked for
    _looked_for: dict[str, str] = PrivateAttr(default_factory=dict)

    def looked_for(self, key: str) -> str:
        """Where the config file's relative `key` (student, teacher) was looked for ('' if
        it was not: absolute, from --set or Python, or found)."""
        return self._looked_for.get(key, "")

    @model_validator(mode="after")
    def _server_fits(self) -> Config:
        """A served teacher gives log p_T only on its top-k and the sampled token: refuse what
        needs more (non-pg losses, full-distribution strategies, a local teacher_sft)."""
        if self.teacher_server is None:
            return self
        from .core.scores import TOPK_UNAVAILABLE
        from .core.selection import strategies_without

        if self.loss.kind != "pg":
            raise ValueError(
                "teacher_server needs loss.kind 'pg': the sampled-token policy gradient is the "
                "only loss that uses nothing but log p_T of the sampled token; "
                f"{self.loss.kind!r} needs the full teacher distribution"
            )
        if self.loss.temperature != 1.0:
            raise ValueError("teacher_server needs loss.temperature 1 (the server's log-probs are)")
        from .core.weights import WEIGHT_ONLY  # iw_opd reads only the sampled-token log-ratio

        served_ok = [*strategies_without(TOPK_UNAVAILABLE), *WEIGHT_ONLY]
        if self.selection.strategy not in served_ok:
            ok = ", ".join(sorted(served_ok))
            raise ValueError(
                f"selection.strategy {self.selection.strategy!r} needs the full teacher "
                f"distribution, which teacher_server does not give; use one of {ok}"
            )
        if self.teacher_server.top_k < self.selection.k:
            raise ValueError(
                f"teacher_server.top_k ({self.teacher_server.top_k}) must be >= selection.k "
                f"({self.selection.k}): S^T is the teacher's top-K"
            )
        if self.teacher_sft is not None:
            raise ValueError(
                "teacher_sft fine-tunes local teacher weights: not with teacher_server"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def training_only(cfg: Config, output_dir: str | Path) -> dict[str, Any]:
    """`cfg` as a dict for a trainer that only trains (the diagnostic's update, the pilot):
    no evaluation, checkpoints, samples, trackers or held-out KL, into `output_dir`."""
    data = cfg.model_dump(mode="json")
    data["output_dir"] = str(output_dir)
    data["train"].update(
        eval_before=False,
        eval_teacher=False,
        eval_every=0,
        save_every=0,
        samples_every=0,
        tensorboard=False,
        report_to=["none"],
    )
    data["eval"]["heldout_kl_prompts"] = 0
    return data


def load_config(
    source: str | Path | dict | None = None, overrides: list[str] | None = None
) -> Config:
    """Build a validated Config from a YAML file / recipe name / dict, then apply overrides.

    A file's relative paths (task.path, student and teacher folders) are looked up beside the
    file first, then in the working directory; `--set` values and dicts are taken as given.
    """
    looked: dict[str, str] = {}
    if source is None:
        data, label = {}, "defaults"
    elif isinstance(source, dict):
        data, label = source, "dict"
    else:
        path, data = read_config_file(source)
        label = str(path)
        looked = resolve_paths(data, path)
    for key in override_keys(overrides):  # a --set value is relative to the working directory
        looked.pop(key, None)
    data = apply_overrides(data, overrides)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise UserError(format_errors(e, Config, label, overrides)) from None
    cfg.task._looked_for = looked.pop("task.path", "")
    cfg._looked_for = looked
    return cfg

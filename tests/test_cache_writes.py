"""The read-through cache writes behind the reads: in batches, off the reader's thread, bounded,
and a cache that cannot be written never fails a read."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import blockstore.storage.cache as cache_module
from blockstore.core.hashing import chunk_key
from blockstore.errors import EnvironmentFailure
from blockstore.storage.cache import ReadThroughCache
from blockstore.storage.lmdb import LmdbStore


@pytest.fixture
def remote(tmp_path: Path):
    values = [os.urandom(32 << 10) for _ in range(64)]
    with LmdbStore.create(tmp_path / "remote") as store:
        store.put_batch((chunk_key(value), value) for value in values)
        yield store, {chunk_key(value): value for value in values}


def _read_all(cache: ReadThroughCache, items: dict[bytes, bytes]) -> None:
    for key, value in items.items():
        assert cache.with_value(key, bytes) == value


def test_misses_are_written_in_batches_and_all_reach_the_cache(
    remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, items = remote
    cache = ReadThroughCache(store, tmp_path / "cache")
    writes: list[int] = []
    put_batch = cache.local.put_batch
    release = threading.Event()

    def slow_put_batch(batch):
        release.wait(10)  # the reader runs ahead of the writer
        batch = list(batch)
        writes.append(len(batch))
        return put_batch(batch)

    monkeypatch.setattr(cache.local, "put_batch", slow_put_batch)
    _read_all(cache, items)  # every miss handed over before any cache write finished
    _read_all(cache, items)  # served from the values waiting to be written
    release.set()
    cache.flush()
    assert cache.misses == len(items) and cache.hits == len(items)
    assert sum(writes) == len(items) and len(writes) < len(items) / 4
    assert sorted(cache.local.iter_keys()) == sorted(items)
    cache.local.close()


def test_waiting_values_are_bounded(remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, items = remote
    monkeypatch.setattr(cache_module, "WRITE_BEHIND_BYTES", 4 * (32 << 10))
    cache = ReadThroughCache(store, tmp_path / "cache")
    put_batch = cache.local.put_batch
    most = [0]

    def watched_put_batch(batch):
        batch = list(batch)
        most[0] = max(most[0], cache._writer._pending_bytes)
        time.sleep(0.005)
        return put_batch(batch)

    monkeypatch.setattr(cache.local, "put_batch", watched_put_batch)
    _read_all(cache, items)
    cache.close()
    assert 0 < most[0] <= 5 * (32 << 10)  # the limit plus the one value that crossed it


def test_a_cache_that_cannot_be_written_never_fails_a_read(
    remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    store, items = remote
    cache = ReadThroughCache(store, tmp_path / "cache")

    def full_disk(batch):
        raise EnvironmentFailure(f"store {tmp_path / 'cache'}", "no space left on device")

    monkeypatch.setattr(cache.local, "put_batch", full_disk)
    _read_all(cache, items)
    cache.flush()
    _read_all(cache, items)  # still served, from the object store
    cache.close()
    errors = capfd.readouterr().err.splitlines()
    assert len(errors) == 1 and "not written to any more" in errors[0] and "no space left" in errors[0]


def test_close_writes_everything_pending(remote, tmp_path: Path) -> None:
    store, items = remote
    with ReadThroughCache(store, tmp_path / "cache") as cache:
        _read_all(cache, items)
    with LmdbStore(tmp_path / "cache") as local:
        assert sorted(local.iter_keys()) == sorted(items)


def test_the_cache_is_under_its_budget_after_every_write(
    remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, items = remote
    budget = 10 * (32 << 10)
    cache = ReadThroughCache(store, tmp_path / "cache", budget=budget)
    put_batch = cache.local.put_batch
    held: list[int] = []

    def watched_put_batch(batch):
        added = put_batch(batch)
        held.append(sum(cache.local.stored_sizes(cache.local.iter_keys()).values()))
        return added

    monkeypatch.setattr(cache.local, "put_batch", watched_put_batch)
    _read_all(cache, items)
    cache.flush()  # and, once flushed, eviction has happened too: no write is left to catch up
    assert held and max(held) <= budget
    assert 0 < sum(cache.local.stored_sizes(cache.local.iter_keys()).values()) <= budget
    cache.close()

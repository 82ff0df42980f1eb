"""The LMDB backend: the shared store suite, plus refs, reflog, map growth and write ordering; and the
suite itself covers the whole contract."""

from __future__ import annotations

import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import blockstore.storage.lmdb as store_module
import blockstore.testing.store as testing_store
from blockstore.core.hashing import chunk_key
from blockstore.errors import InvalidArgument, RefConflict, StoreCorrupt
from blockstore.ops.export import export
from blockstore.ops.pack import pack
from blockstore.ops.verify import verify
from blockstore.repo import Repository
from blockstore.storage.base import Store, StoreBase
from blockstore.storage.cache import ReadThroughCache
from blockstore.storage.lmdb import LmdbStore
from blockstore.storage.wrapper import StoreWrapper
from blockstore.testing.store import StoreSuite

from .helpers import random_tensor, sha256, write_safetensors


class TestLmdbStore(StoreSuite):
    @pytest.fixture
    def store(self, tmp_path: Path):
        with LmdbStore.create(tmp_path / "store") as opened:
            yield opened


def test_map_grows_between_transactions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "INITIAL_MAP_SIZE", 1 << 20)
    with LmdbStore.create(tmp_path / "store") as store:
        values = [bytes([n]) * (1 << 20) for n in range(6)]
        store.put_batch((bytes([n]) * 16, v) for n, v in enumerate(values))
        assert store.env.info()["map_size"] >= 6 << 20
        assert [store.get(bytes([n]) * 16) for n in range(6)] == values


def test_a_commit_that_fills_the_map_grows_it_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LMDB can report MDB_MAP_FULL from the commit (its freelist pages), not only from a put: the
    write must grow the map and retry, not fail as an environment error (a CI run hit this)."""
    commits = {"failed": 0}

    class FullAtCommit:
        """A write transaction whose commit fails the way LMDB's does when the map is full."""

        def __init__(self, txn) -> None:
            self._txn = txn

        def __getattr__(self, name: str):
            return getattr(self._txn, name)

        def __exit__(self, kind, exc, traceback) -> None:
            self._txn.abort()
            raise store_module.lmdb.MapFullError("mdb_txn_commit: MDB_MAP_FULL")

    class CommitFillsOnce(store_module._Transaction):
        def __init__(self, path, txn, doing, write) -> None:
            if write and not commits["failed"]:
                commits["failed"] += 1
                txn = FullAtCommit(txn)
            super().__init__(path, txn, doing, write)

    with LmdbStore.create(tmp_path / "store") as store:
        before = store.env.info()["map_size"]
        monkeypatch.setattr(store_module, "_Transaction", CommitFillsOnce)
        store.put_batch([(b"k" * 16, b"value")])
        assert commits["failed"] == 1 and store.env.info()["map_size"] == 2 * before
        assert store.get(b"k" * 16) == b"value"


def test_ref_compare_and_set_and_reflog(tmp_path: Path) -> None:
    model = write_safetensors(tmp_path / "m.safetensors", {"w": random_tensor("F32", (4, 4))})
    with Repository.init(tmp_path / "store") as repo:
        first = pack(repo, [model], message="one")
        store = repo.store
        with pytest.raises(RefConflict, match="moved from"):
            store.move_ref("main", first.snapshot_id, None, "pack", "stale writer")
        with pytest.raises(StoreCorrupt, match="absent snapshot"):
            store.move_ref("main", b"\1" * 32, first.snapshot_id, "pack", "")
        log = store.reflog("main")
        assert [(e.old, e.new, e.op, e.message) for e in log] == [(None, first.snapshot_id, "pack", "one")]
        assert store.reflog("mai") == [] and store.reflog("main2") == []


def test_interrupted_pack_leaves_last_good_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write order: chunks, then snapshot, then ref. A failure before the ref moves publishes nothing."""
    v1 = write_safetensors(tmp_path / "v1.safetensors", {"w": random_tensor("F32", (64, 64), seed=1)})
    v2 = write_safetensors(tmp_path / "v2.safetensors", {"w": random_tensor("F32", (64, 64), seed=2)})
    with Repository.init(tmp_path / "store") as repo:
        good = pack(repo, [v1])
        for step in ("put_snapshot", "move_ref"):
            with monkeypatch.context() as patch:

                def crash(*args: object, **kwargs: object) -> None:
                    raise OSError("simulated crash")

                patch.setattr(LmdbStore, step, crash)
                with pytest.raises(OSError, match="simulated crash"):
                    pack(repo, [v2])
            assert repo.resolve("main") == good.snapshot_id
            report = verify(repo, deep=True)
            assert report.clean
            if step == "put_snapshot":  # v2's chunks were written; no snapshot points at them
                assert report.orphans
            else:  # v2's snapshot was written too, but no ref points at it
                assert report.snapshots == 2 and not report.orphans
            export(repo, repo.resolve("main"), tmp_path / "out")
            assert sha256(tmp_path / "out") == sha256(v1)
        retried = pack(repo, [v2])
        assert retried.new_chunks == 0 and repo.resolve("main") == retried.snapshot_id


def test_handles_on_one_path_share_one_environment(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with LmdbStore.create(path) as writer:
        writer.put_batch([(b"k" * 16, b"value")])
        with LmdbStore(path, readonly=True) as reader:  # LMDB forbids a second open environment
            assert reader.env is writer.env and reader.get(b"k" * 16) == b"value"
        assert writer.get(b"k" * 16) == b"value"  # the reader's close left the writer's env open
    with LmdbStore(path, readonly=True) as reader, pytest.raises(InvalidArgument, match="read-only"):
        LmdbStore(path)


def _contract_members() -> set[str]:
    members = {name for name in vars(Store) if not name.startswith("_")}
    return members | set(Store.__annotations__)


def test_the_suite_exercises_every_member_of_the_contract() -> None:
    """A member added to `Store` without a test in the shared suite fails here."""
    source = inspect.getsource(testing_store)
    untested = sorted(name for name in _contract_members() if f".{name}" not in source)
    assert len(_contract_members()) >= 28 and not untested, untested


def test_the_wrapper_forwards_every_member_explicitly() -> None:
    """Written out member by member (no __getattr__), so nothing is passed on by accident."""
    defined = set(vars(StoreWrapper)) | set(vars(StoreBase))
    assert not _contract_members() - defined, sorted(_contract_members() - defined)
    assert "__getattr__" not in defined


def test_the_map_grows_while_many_threads_read_through_a_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More reader threads than cores fill an empty read-through cache whose map must grow many
    times mid-load: LMDB forbids resizing beside an open transaction (mdb_put: Invalid argument
    before the resize gate), so every read must still come back whole and the map must grow."""
    monkeypatch.setattr(store_module, "INITIAL_MAP_SIZE", 1 << 20)
    values = [os.urandom(64 << 10) for _ in range(192)]
    items = [(chunk_key(value), value) for value in values]
    with LmdbStore.create(tmp_path / "remote") as remote:
        remote.put_batch(items)
        cache = ReadThroughCache(remote, tmp_path / "cache", budget=1 << 40)
        threads = max(16, 4 * (os.cpu_count() or 1))

        def read(pair: tuple[bytes, bytes]) -> bool:
            key, value = pair
            return cache.with_value(key, lambda view: bytes(view) == value)

        with ThreadPoolExecutor(threads) as pool:
            assert all(pool.map(read, items * 3))
        cache.flush()
        assert cache.local.env.info()["map_size"] >= 8 << 20
        assert cache.misses >= len(items) and sorted(cache.local.iter_keys()) == sorted(k for k, _ in items)
        cache.local.close()

"""The LMDB backend: the shared ChunkStore suite, plus refs, reflog, map growth and write ordering."""

from __future__ import annotations

from pathlib import Path

import pytest

import blockstore.storage.lmdb as store_module
from blockstore.errors import InvalidArgument, RefConflict, StoreCorrupt
from blockstore.ops.export import export
from blockstore.ops.pack import pack
from blockstore.ops.verify import verify
from blockstore.repo import Repository
from blockstore.storage.lmdb import LmdbStore

from .helpers import random_tensor, sha256, write_safetensors
from .store_suite import CatalogSuite, ChunkStoreSuite


class TestLmdbStore(ChunkStoreSuite, CatalogSuite):
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

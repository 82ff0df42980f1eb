"""One test suite every ChunkStore backend must pass (zarr's StoreTests, restic's backend tests).

Subclass `ChunkStoreSuite` and `CatalogSuite` in a backend's test module and provide a `store`
fixture (an empty store). LMDB runs them in test_store.py, object stores in test_objectstore.py.
"""

from __future__ import annotations

import pytest

from blockstore.core.hashing import chunk_key
from blockstore.errors import ChunkMissing, RefConflict, SnapshotNotFound, StoreCorrupt


def item(text: str) -> tuple[bytes, bytes]:
    value = text.encode() * 10
    return chunk_key(value), value


class ChunkStoreSuite:
    def test_put_get_roundtrip(self, store) -> None:
        key, value = item("a")
        assert store.put_batch([(key, value)]) == len(value)
        assert store.get(key) == value

    def test_missing_key_raises(self, store) -> None:
        with pytest.raises(ChunkMissing, match=chunk_key(b"nope").hex()):
            store.get(chunk_key(b"nope"))

    def test_with_value_hands_the_value_to_its_function(self, store) -> None:
        key, value = item("v")
        store.put_batch([(key, value)])
        assert store.with_value(key, lambda stored: (bytes(stored), len(stored))) == (value, len(value))
        called = []
        with pytest.raises(ChunkMissing, match=chunk_key(b"nope").hex()):
            store.with_value(chunk_key(b"nope"), called.append)
        assert not called

    def test_put_is_idempotent_and_never_overwrites(self, store) -> None:
        key, value = item("b")
        store.put_batch([(key, value)])
        assert store.put_batch([(key, b"other bytes")]) == 0
        assert store.get(key) == value

    def test_contains_and_sizes(self, store) -> None:
        present, value = item("c")
        absent, _ = item("d")
        store.put_batch([(present, value)])
        assert store.contains([present, absent]) == {present}
        assert store.stored_sizes([present, absent]) == {present: len(value)}

    def test_batch_and_iteration(self, store) -> None:
        items = [item(str(n)) for n in range(50)]
        assert store.put_batch(items) == sum(len(v) for _, v in items)
        assert sorted(store.iter_keys()) == sorted(k for k, _ in items)

    def test_delete_batch(self, store) -> None:
        items = [item(str(n)) for n in range(5)]
        store.put_batch(items)
        assert store.delete_batch([k for k, _ in items[:2]] + [chunk_key(b"absent")]) == 2
        assert sorted(store.iter_keys()) == sorted(k for k, _ in items[2:])
        with pytest.raises(ChunkMissing):
            store.get(items[0][0])

    def test_get_many_in_order_then_missing(self, store) -> None:
        items = [item(str(n)) for n in range(30)]
        store.put_batch(items)
        keys = [key for key, _ in reversed(items)]
        assert list(store.get_many(keys)) == [value for _, value in reversed(items)]
        values = store.get_many([items[0][0], chunk_key(b"nope"), items[1][0]])
        assert next(values) == items[0][1]
        with pytest.raises(ChunkMissing, match=chunk_key(b"nope").hex()):
            next(values)

    def test_empty_value(self, store) -> None:
        key = chunk_key(b"")
        store.put_batch([(key, b"")])
        assert store.get(key) == b""


class CatalogSuite:
    """Snapshots, refs, reflog and leases: what every backend's catalog must do the same way."""

    def test_snapshots_are_create_only(self, store) -> None:
        store.put_snapshot(b"\1" * 32, b"first")
        store.put_snapshot(b"\1" * 32, b"second")
        assert store.get_snapshot_bytes(b"\1" * 32) == b"first"
        assert store.get_snapshot_bytes(b"\2" * 32) is None
        assert store.snapshot_ids() == [b"\1" * 32]

    def test_ref_compare_and_set_and_reflog(self, store) -> None:
        one, two = b"\1" * 32, b"\2" * 32
        store.put_snapshot(one, b"one")
        store.put_snapshot(two, b"two")
        store.move_ref("main", one, None, "pack", "first")
        with pytest.raises(RefConflict):
            store.move_ref("main", two, None, "pack", "stale")
        with pytest.raises(StoreCorrupt, match="absent snapshot"):
            store.move_ref("main", b"\3" * 32, one, "pack", "nothing there")
        store.move_ref("main", two, one, "apply", "second")
        store.move_ref("main", one, two, "rollback", "back")  # A -> B -> A
        store.move_ref("release/v1", two, None, "tag", "tag")
        assert store.refs() == {"main": one, "release/v1": two}
        assert store.get_ref("main") == one and store.get_ref("nope") is None
        log = [(e.old, e.new, e.op, e.message) for e in store.reflog("main")]
        assert log == [
            (None, one, "pack", "first"),
            (one, two, "apply", "second"),
            (two, one, "rollback", "back"),
        ]
        assert [e.new for e in store.reflog("release/v1")] == [two] and store.reflog("release") == []

    def test_writer_leases_and_reader_pins(self, store) -> None:
        store.put_snapshot(b"\1" * 32, b"one")
        writer = store.acquire_lease()
        reader = store.acquire_lease(pin=b"\1" * 32)
        with pytest.raises(SnapshotNotFound):
            store.acquire_lease(pin=b"\2" * 32)
        assert {lease.pin for lease in store.leases()} == {None, b"\1" * 32}
        assert store.pinned_snapshots() == {b"\1" * 32}
        store.release_lease(writer)
        store.release_lease(reader)
        assert store.leases() == [] and store.pinned_snapshots() == set()

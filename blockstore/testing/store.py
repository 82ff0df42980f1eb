"""One test suite every store must pass: backends (LMDB, object stores) and wrappers alike.

Subclass `StoreSuite` in a test module and provide a `store` fixture that yields an empty, writable
store and closes it afterwards; nothing else is needed from the test module::

    class TestMyStore(StoreSuite):
        @pytest.fixture
        def store(self, tmp_path):
            with MyStore.create(tmp_path / "store") as opened:
                yield opened

The tests are grouped like the contract (chunks, catalog, leases, housekeeping), and together
touch every member of `Store` (blockstore's own tests check that they do). Deleted chunks are
checked with `contains` and `iter_keys`, not `get`: a read-through cache may still serve a value
it holds, which is harmless for content-addressed data.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache

import msgpack
import pytest

from blockstore.core.chunks import delta_value
from blockstore.core.hashing import chunk_key
from blockstore.errors import ChunkMissing, RefConflict, SnapshotNotFound, StoreCorrupt, WriterActive
from blockstore.storage.base import Capabilities, Lease, Store

ONE, TWO, THREE = b"\1" * 32, b"\2" * 32, b"\3" * 32


def item(text: str) -> tuple[bytes, bytes]:
    """A chunk (key, value) whose key is the hash of its value, as in a real store."""
    value = text.encode() * 10
    return chunk_key(value), value


@cache
def dead_pid() -> int:
    """The id of a process on this host that has exited (what a killed reader or writer leaves)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


class _SuiteFixtures:
    """Fixtures the suite makes for itself (a subclass provides only `store`)."""

    @pytest.fixture
    def leases_of_a_dead_process(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """Leases taken while this fixture is active are recorded as a dead process's: stale."""

        def record(pin: bytes | None) -> bytes:
            return msgpack.packb([dead_pid(), socket.gethostname(), time.time_ns(), pin])

        with monkeypatch.context() as patch:
            patch.setattr(Lease, "record", staticmethod(record))
            yield


class ChunkTests(_SuiteFixtures):
    def test_put_get_roundtrip(self, store: Store) -> None:
        key, value = item("a")
        assert store.put_batch([(key, value)]) == len(value)
        assert store.get(key) == value

    def test_missing_key_raises(self, store: Store) -> None:
        with pytest.raises(ChunkMissing, match=chunk_key(b"nope").hex()):
            store.get(chunk_key(b"nope"))

    def test_with_value_hands_the_value_to_its_function(self, store: Store) -> None:
        key, value = item("v")
        store.put_batch([(key, value)])
        assert store.with_value(key, lambda stored: (bytes(stored), len(stored))) == (value, len(value))
        called: list[object] = []
        with pytest.raises(ChunkMissing, match=chunk_key(b"nope").hex()):
            store.with_value(chunk_key(b"nope"), called.append)
        assert not called

    def test_a_store_is_marked_for_deltas_once_asked(self, store: Store) -> None:
        """A new store holds no delta chunks; `allow_deltas` marks it (twice is once), and chunk
        writes after it neither undo the mark nor lose a value."""
        assert store.deltas_allowed is False
        key, value = item("delta")
        store.put_batch([(key, value)])
        store.allow_deltas()
        store.allow_deltas()
        assert store.deltas_allowed is True
        other, second = item("after")
        store.put_batch([(other, second)])
        assert store.deltas_allowed is True and store.get(key) == value and store.get(other) == second

    def test_a_batch_that_brings_a_delta_marks_the_store_first(self, store: Store) -> None:
        """Every writer of chunk values (pack, copies, the read-through cache) goes through
        `put_batch`, so the store itself raises its mark before a delta lands in it."""
        key, value = item("plain")
        store.put_batch([(key, value)])
        assert store.deltas_allowed is False
        base, base_value = item("base")
        raw = bytes(len(base_value))
        delta = delta_value(memoryview(raw), base, base_value, 1, 3)
        store.put_batch([(chunk_key(raw), delta)])
        assert store.deltas_allowed is True and store.get(chunk_key(raw)) == delta

    def test_value_start_reads_the_front_of_a_value(self, store: Store) -> None:
        key, value = item("start")
        store.put_batch([(key, value)])
        assert store.value_start(key, 3) == value[:3]
        assert store.value_start(key, len(value) + 100) == value  # a shorter value comes whole
        with pytest.raises(ChunkMissing, match=chunk_key(b"nope").hex()):
            store.value_start(chunk_key(b"nope"), 8)

    def test_put_is_idempotent_and_never_overwrites(self, store: Store) -> None:
        key, value = item("b")
        store.put_batch([(key, value)])
        assert store.put_batch([(key, b"other bytes")]) == 0
        assert store.get(key) == value

    def test_contains_and_sizes(self, store: Store) -> None:
        present, value = item("c")
        absent, _ = item("d")
        store.put_batch([(present, value)])
        assert store.contains([present, absent]) == {present}
        assert store.stored_sizes([present, absent]) == {present: len(value)}
        assert store.contains([]) == set() and store.stored_sizes([]) == {}

    def test_batch_and_iteration(self, store: Store) -> None:
        assert list(store.iter_keys()) == []
        items = [item(str(n)) for n in range(50)]
        assert store.put_batch(items) == sum(len(v) for _, v in items)
        assert sorted(store.iter_keys()) == sorted(k for k, _ in items)

    def test_delete_batch(self, store: Store) -> None:
        items = [item(str(n)) for n in range(5)]
        store.put_batch(items)
        assert store.delete_batch([k for k, _ in items[:2]] + [chunk_key(b"absent")]) == 2
        assert sorted(store.iter_keys()) == sorted(k for k, _ in items[2:])
        assert store.contains([k for k, _ in items]) == {k for k, _ in items[2:]}
        with pytest.raises(ChunkMissing):
            store.get(items[0][0])

    def test_get_many_in_order_then_missing(self, store: Store) -> None:
        items = [item(str(n)) for n in range(30)]
        store.put_batch(items)
        keys = [key for key, _ in reversed(items)]
        assert list(store.get_many(keys)) == [value for _, value in reversed(items)]
        values = store.get_many([items[0][0], chunk_key(b"nope"), items[1][0]])
        assert next(values) == items[0][1]
        with pytest.raises(ChunkMissing, match=chunk_key(b"nope").hex()):
            next(values)

    def test_map_ordered_keeps_order_and_raises_where_it_failed(self, store: Store) -> None:
        assert list(store.map_ordered(lambda n: n * n, range(40))) == [n * n for n in range(40)]

        def fail_at_five(n: int) -> int:
            if n == 5:
                raise ValueError("five")
            return n

        results = store.map_ordered(fail_at_five, range(10))
        assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(ValueError, match="five"):
            next(results)

    def test_empty_value(self, store: Store) -> None:
        key = chunk_key(b"")
        store.put_batch([(key, b"")])
        assert store.get(key) == b""


class CatalogTests(_SuiteFixtures):
    """Snapshots, refs and reflog: what every backend's catalog must do the same way."""

    def test_snapshots_are_create_only(self, store: Store) -> None:
        assert store.snapshot_ids() == []
        store.put_snapshot(ONE, b"first")
        store.put_snapshot(ONE, b"second")
        assert store.get_snapshot_bytes(ONE) == b"first"
        assert store.get_snapshot_bytes(TWO) is None
        assert store.snapshot_ids() == [ONE]

    def test_ref_compare_and_set_and_reflog(self, store: Store) -> None:
        store.put_snapshot(ONE, b"one")
        store.put_snapshot(TWO, b"two")
        assert store.refs() == {} and store.reflog("main") == []
        store.move_ref("main", ONE, None, "pack", "first")
        with pytest.raises(RefConflict):
            store.move_ref("main", TWO, None, "pack", "stale")
        with pytest.raises(StoreCorrupt, match="absent snapshot"):
            store.move_ref("main", THREE, ONE, "pack", "nothing there")
        store.move_ref("main", TWO, ONE, "apply", "second")
        store.move_ref("main", ONE, TWO, "rollback", "back")  # A -> B -> A
        store.move_ref("release/v1", TWO, None, "tag", "tag")
        assert store.refs() == {"main": ONE, "release/v1": TWO}
        assert store.get_ref("main") == ONE and store.get_ref("nope") is None
        log = [(e.old, e.new, e.op, e.message) for e in store.reflog("main")]
        assert log == [
            (None, ONE, "pack", "first"),
            (ONE, TWO, "apply", "second"),
            (TWO, ONE, "rollback", "back"),
        ]
        assert [e.new for e in store.reflog("release/v1")] == [TWO] and store.reflog("release") == []
        times = [e.time_ns for e in store.reflog("main")]
        assert times == sorted(times) and abs(times[-1] - time.time_ns()) < 600e9

    def test_a_conflict_leaves_ref_and_reflog_alone(self, store: Store) -> None:
        store.put_snapshot(ONE, b"one")
        store.put_snapshot(TWO, b"two")
        store.move_ref("main", ONE, None, "pack", "first")
        with pytest.raises(RefConflict):
            store.move_ref("main", TWO, TWO, "apply", "expected the wrong thing")
        assert store.get_ref("main") == ONE and len(store.reflog("main")) == 1


class LeaseTests(_SuiteFixtures):
    def test_writer_leases_and_reader_pins(self, store: Store) -> None:
        store.put_snapshot(ONE, b"one")
        writer = store.acquire_lease()
        reader = store.acquire_lease(pin=ONE)
        with pytest.raises(SnapshotNotFound):
            store.acquire_lease(pin=TWO)
        assert {lease.pin for lease in store.leases()} == {None, ONE}
        assert store.pinned_snapshots() == {ONE}
        store.release_lease(writer)
        assert store.pinned_snapshots() == {ONE}
        store.release_lease(reader)
        assert store.leases() == [] and store.pinned_snapshots() == set()

    def test_a_lease_says_who_holds_it(self, store: Store) -> None:
        store.put_snapshot(ONE, b"one")
        before = time.time_ns()
        writer = store.acquire_lease()
        reader = store.acquire_lease(pin=ONE)
        found = {lease.lease_id: lease for lease in store.leases()}
        assert set(found) == {writer, reader}
        for lease in found.values():
            assert (lease.pid, lease.host) == (os.getpid(), socket.gethostname())
            assert before <= lease.time_ns <= time.time_ns() and not lease.stale
        assert found[writer].pin is None and found[writer].role == "writer"
        assert found[reader].pin == ONE and found[reader].role == f"reader of {ONE.hex()[:12]}"
        store.release_lease(writer)
        store.release_lease(reader)

    def test_leases_of_dead_processes_are_stale(self, store: Store, leases_of_a_dead_process: None) -> None:
        store.put_snapshot(ONE, b"one")
        store.acquire_lease()
        store.acquire_lease(pin=ONE)
        leases = store.leases()
        assert len(leases) == 2 and all(lease.stale for lease in leases)
        assert store.pinned_snapshots() == set()  # a dead reader pins nothing


class HousekeepingTests(_SuiteFixtures):
    """Garbage collection and its refusals, the roots fingerprint, counts, sizes, parameters."""

    def _populate(self, store: Store) -> tuple[bytes, bytes]:
        """ONE (referenced by main, holding `kept`) and TWO (unreferenced, holding `doomed`)."""
        (kept, kept_value), (doomed, doomed_value) = item("kept"), item("doomed")
        store.put_batch([(kept, kept_value), (doomed, doomed_value)])
        store.put_snapshot(ONE, b"one")
        store.put_snapshot(TWO, b"two")
        store.move_ref("main", ONE, None, "pack", "")
        return kept, doomed

    def _nothing_deleted(self, store: Store, kept: bytes, doomed: bytes) -> None:
        assert store.snapshot_ids() == [ONE, TWO]
        assert store.contains([kept, doomed]) == {kept, doomed}

    def test_roots_fingerprint_follows_refs_and_reflog(self, store: Store) -> None:
        assert store.roots_fingerprint() == ({}, 0)
        store.put_snapshot(ONE, b"one")
        store.put_snapshot(TWO, b"two")
        store.move_ref("main", ONE, None, "pack", "")
        assert store.roots_fingerprint() == ({"main": ONE}, 1)
        store.move_ref("main", TWO, ONE, "apply", "")
        store.move_ref("main", ONE, TWO, "rollback", "")  # refs as before, but the reflog grew
        assert store.roots_fingerprint() == ({"main": ONE}, 3)
        store.move_ref("v1", TWO, None, "tag", "")
        assert store.roots_fingerprint() == ({"main": ONE, "v1": TWO}, 4)

    def test_collect_deletes_what_it_is_given(self, store: Store) -> None:
        kept, doomed = self._populate(store)
        store.collect([TWO], [doomed], store.roots_fingerprint())
        assert store.snapshot_ids() == [ONE] and store.get_snapshot_bytes(TWO) is None
        assert store.contains([kept, doomed]) == {kept} and list(store.iter_keys()) == [kept]
        assert store.refs() == {"main": ONE} and len(store.reflog("main")) == 1
        assert store.get_snapshot_bytes(ONE) == b"one" and store.get(kept) == item("kept")[1]

    def test_collect_refuses_while_a_writer_holds_a_lease(self, store: Store) -> None:
        kept, doomed = self._populate(store)
        writer = store.acquire_lease()
        with pytest.raises(WriterActive, match="writer"):
            store.collect([TWO], [doomed], store.roots_fingerprint())
        self._nothing_deleted(store, kept, doomed)
        assert [lease.lease_id for lease in store.leases()] == [writer]
        store.release_lease(writer)
        store.collect([TWO], [doomed], store.roots_fingerprint())
        assert store.snapshot_ids() == [ONE]

    def test_collect_refuses_a_plan_made_before_refs_moved(self, store: Store) -> None:
        kept, doomed = self._populate(store)
        planned = store.roots_fingerprint()
        store.move_ref("v1", TWO, None, "tag", "")  # TWO is a root now
        with pytest.raises(WriterActive, match="refs moved"):
            store.collect([TWO], [doomed], planned)
        self._nothing_deleted(store, kept, doomed)

    def test_collect_keeps_what_a_reader_pinned(self, store: Store) -> None:
        kept, doomed = self._populate(store)
        reader = store.acquire_lease(pin=TWO)
        with pytest.raises(WriterActive, match="reader of"):
            store.collect([TWO], [doomed], store.roots_fingerprint())
        self._nothing_deleted(store, kept, doomed)
        store.release_lease(reader)
        elsewhere = store.acquire_lease(pin=ONE)  # a reader of a kept snapshot does not stop gc
        store.collect([TWO], [doomed], store.roots_fingerprint())
        assert store.snapshot_ids() == [ONE] and store.pinned_snapshots() == {ONE}
        store.release_lease(elsewhere)

    def test_collect_ignores_and_removes_stale_leases(
        self, store: Store, leases_of_a_dead_process: None
    ) -> None:
        kept, doomed = self._populate(store)
        store.acquire_lease()  # a writer killed mid-pack
        store.acquire_lease(pin=TWO)  # a reader killed mid-load
        assert len(store.leases()) == 2
        store.collect([TWO], [doomed], store.roots_fingerprint())
        assert store.leases() == [] and store.snapshot_ids() == [ONE]
        assert store.contains([kept, doomed]) == {kept}

    def test_collect_of_nothing_removes_nothing(self, store: Store) -> None:
        kept, doomed = self._populate(store)
        store.collect([], [], store.roots_fingerprint())
        self._nothing_deleted(store, kept, doomed)

    def test_stat_counts_every_kind(self, store: Store) -> None:
        empty = store.stat()
        assert (empty["chunks"], empty["snapshots"], empty["refs"], empty["reflog"]) == (0, 0, 0, 0)
        self._populate(store)
        store.put_batch([item("third")])
        store.move_ref("main", TWO, ONE, "apply", "")
        store.move_ref("v1", ONE, None, "tag", "")
        counts = store.stat()
        assert (counts["chunks"], counts["snapshots"], counts["refs"], counts["reflog"]) == (3, 2, 2, 3)
        assert counts["file_bytes"] > 0

    def test_usage_reports_what_the_backend_has(self, store: Store) -> None:
        store.put_batch([item("x")])
        usage = store.usage()
        assert usage["file_bytes"] > 0
        memory_map = {"map_size", "map_used", "reader_slots", "max_readers", "stale_readers_cleared"}
        if store.capabilities.memory_map:
            assert memory_map <= set(usage)
            assert 0 < usage["map_used"] <= usage["map_size"]
            assert 0 <= usage["reader_slots"] <= usage["max_readers"] and usage["stale_readers_cleared"] >= 0
        else:  # nothing faked: an object store has no map and no reader slots to report
            assert not memory_map & set(usage)

    def test_meta_int_reads_creation_parameters(self, store: Store) -> None:
        created = store.meta_int("created_ns")
        assert created is not None and 0 < created <= time.time_ns()
        assert store.meta_int("no-such-parameter") is None

    def test_capabilities_are_a_frozen_value(self, store: Store) -> None:
        capabilities = store.capabilities
        assert isinstance(capabilities, Capabilities) and capabilities.concurrency >= 1
        assert capabilities.conditional_writes  # the suite's stores honour create-only and If-Match
        with pytest.raises(dataclasses.FrozenInstanceError):
            capabilities.concurrency = 99  # type: ignore[misc]
        assert store.capabilities == capabilities

    def test_the_store_is_a_store(self, store: Store) -> None:
        assert isinstance(store, Store)
        assert not store.readonly and str(store.path)

    def test_close_twice_is_harmless(self, store: Store) -> None:
        store.close()
        store.close()


class StoreSuite(ChunkTests, CatalogTests, LeaseTests, HousekeepingTests):
    """The whole contract; subclass it and provide a `store` fixture (an empty, writable store)."""

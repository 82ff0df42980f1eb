"""The store contract: what `Repository` may ask of any backend, and the values they share.

A store holds four kinds of things, and the contract is grouped the same way:
- **chunks**: content-addressed values (key = hash of the decoded bytes), create-only;
- **catalog**: snapshots (create-only, id = hash of their bytes), refs (mutable names moved only
  with compare-and-set) and each ref's reflog (append-only, written with the move);
- **leases**: who is using the store right now (a writer, or a reader pinning one snapshot), which
  is what makes garbage collection safe beside them;
- **housekeeping**: garbage collection (`collect`), counts and sizes, creation parameters, close.

Backends: `LmdbStore` (a local directory), `ObjectStore` (S3-compatible); wrappers
(`StoreWrapper`: the read-through cache, the tests' fault-injecting store) sit in front of one.
What differs between them and a caller may need to know is in `Capabilities`, never in fields a
backend has to fake. `blockstore.testing.store.StoreSuite` checks a backend against all of this.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import msgpack

from blockstore.core.chunks import is_delta_value
from blockstore.core.hashing import ChunkKey

_T = TypeVar("_T")

Location = str | Path
"""Where a store lives: an LMDB directory, or an object store URL `s3://bucket/prefix`."""

Fingerprint = tuple[dict[str, bytes], int]
"""Refs and the reflog's length (see `Store.roots_fingerprint`)."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, for callers whose behaviour or report depends on it."""

    zero_copy_values: bool
    """`with_value` hands `use` a view of a local memory map (valid only during the call), so a
    decoder reads stored bytes where they lie; otherwise it gets an object of its own per read
    (`bytes` or a read-only buffer), which it may keep after the call."""
    memory_map: bool
    """An LMDB environment: `usage()` also reports map size and use, reader slots and the stale
    reader slots cleared on open (what `doctor` shows); an object store has none of those."""
    conditional_writes: bool
    """Create-only writes and compare-and-set on refs are honoured (always on LMDB; on an object
    store, probed at open: a server that ignores If-None-Match/If-Match gets no ref moves)."""
    concurrency: int
    """How many requests `get_many`/`map_ordered` keep in flight (1: a local map, reads are
    sequential because nothing is gained by overlapping them)."""


@dataclass(frozen=True)
class ReflogEntry:
    """One move of a ref: when, from where to where, by which operation, and why."""

    time_ns: int
    old: bytes | None
    new: bytes
    op: str
    message: str

    def to_bytes(self) -> bytes:
        return msgpack.packb([self.time_ns, self.old, self.new, self.op, self.message], use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReflogEntry:
        time_ns, old, new, op, message = msgpack.unpackb(data, raw=False)
        return cls(int(time_ns), old, bytes(new), str(op), str(message))


@dataclass(frozen=True)
class Lease:
    """Someone using the store: a writer (no `pin`) or a reader of snapshot `pin`."""

    lease_id: bytes
    pid: int
    host: str
    time_ns: int
    pin: bytes | None

    @property
    def stale(self) -> bool:
        """The process is gone (only decidable for processes on this host)."""
        return self.host == socket.gethostname() and not process_alive(self.pid)

    @property
    def role(self) -> str:
        return f"reader of {short_id(self.pin)}" if self.pin else "writer"

    def describe(self) -> str:
        return f"{self.role}, pid {self.pid} on {self.host}"

    @classmethod
    def from_record(cls, lease_id: bytes, record: bytes) -> Lease:
        """A stored lease record: msgpack [pid, host, time_ns, pin] (writers before pins: 3 fields)."""
        pid, host, time_ns, *pin = msgpack.unpackb(record, raw=False)
        return cls(lease_id, pid, host, time_ns, pin[0] if pin else None)

    @staticmethod
    def record(pin: bytes | None) -> bytes:
        return msgpack.packb([os.getpid(), socket.gethostname(), time.time_ns(), pin])


def blocking_leases(leases: list[Lease], doomed: set[bytes]) -> list[Lease]:
    """Live leases that forbid deleting `doomed` snapshots: any writer, and readers pinning one."""
    return [lease for lease in leases if not lease.stale and (lease.pin is None or lease.pin in doomed)]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def short_id(snapshot_id: bytes | None) -> str:
    """The 12 hex digits a snapshot id is shown as (or "(nothing)" for no snapshot)."""
    return snapshot_id.hex()[:12] if snapshot_id else "(nothing)"


@runtime_checkable
class Store(Protocol):
    """Every member `Repository` uses on a store. Writes are ordered chunks → snapshot → ref by
    the callers, so a crash leaves at worst unreferenced chunks, never a ref to something missing."""

    @property
    def path(self) -> Location:
        """Where the store lives (shown in messages)."""
        ...

    @property
    def readonly(self) -> bool:
        """Opened without write access: no leases can be taken (readers are then unpinned)."""
        ...

    @property
    def capabilities(self) -> Capabilities: ...

    # chunks -------------------------------------------------------------------------------------

    def get(self, key: ChunkKey) -> bytes:
        """The stored value of chunk `key`; raises ChunkMissing naming the key."""
        ...

    def with_value(self, key: ChunkKey, use: Callable[[bytes | memoryview], _T]) -> _T:
        """`use(value)` for chunk `key`; the value may be a view valid only during the call."""
        ...

    def get_many(self, keys: Iterable[ChunkKey]) -> Iterator[bytes]:
        """Values in the order of `keys`, lazily (a missing one raises when it is reached)."""
        ...

    def value_start(self, key: ChunkKey, length: int) -> bytes:
        """The first `length` bytes of chunk `key`'s stored value (all of it when it is shorter):
        its envelope without its payload (on an object store, a range request). Raises
        ChunkMissing naming the key."""
        ...

    def map_ordered(self, function: Callable[[Any], _T], items: Iterable[Any]) -> Iterator[_T]:
        """`function` over `items`, results in order, overlapped as `capabilities.concurrency` says."""
        ...

    def stored_sizes(self, keys: Iterable[ChunkKey]) -> dict[ChunkKey, int]:
        """Stored value length of each key present (absent keys are left out)."""
        ...

    def contains(self, keys: Iterable[ChunkKey]) -> set[ChunkKey]:
        """The keys among `keys` that are stored."""
        ...

    def put_batch(self, items: Iterable[tuple[ChunkKey, bytes]]) -> int:
        """Store chunks not there yet (never overwrites); returns the bytes newly written. Before a
        batch that brings a delta chunk, the store marks itself as holding them (`allow_deltas`)."""
        ...

    def delete_batch(self, keys: Iterable[ChunkKey]) -> int:
        """Delete chunks; returns how many were there."""
        ...

    @property
    def deltas_allowed(self) -> bool:
        """Whether the store is marked as one that may hold delta chunks (`allow_deltas`): a store
        that is not needs no look at its values to find them (gc, transfers)."""
        ...

    def allow_deltas(self) -> None:
        """Mark the store as one that may hold delta chunk values (format /3, FORMAT.md §6), before
        the first is written: a reader that cannot decode them then refuses the store by its
        format instead of reporting its deltas as damage. Idempotent."""
        ...

    def iter_keys(self) -> Iterator[ChunkKey]:
        """Every chunk key stored (a snapshot of the listing, safe to consume while writing)."""
        ...

    # catalog: snapshots -------------------------------------------------------------------------

    def get_snapshot_bytes(self, snapshot_id: bytes) -> bytes | None: ...

    def put_snapshot(self, snapshot_id: bytes, data: bytes) -> None:
        """Store a snapshot's bytes under its id; a second put of the id changes nothing."""
        ...

    def snapshot_ids(self) -> list[bytes]: ...

    # catalog: refs and reflog -------------------------------------------------------------------

    def refs(self) -> dict[str, bytes]: ...

    def get_ref(self, name: str) -> bytes | None: ...

    def move_ref(self, name: str, new: bytes, expected: bytes | None, op: str, message: str) -> None:
        """Point `name` at `new` if it still points at `expected` (RefConflict otherwise), and log
        the move; refuses (StoreCorrupt) to point at a snapshot that is not stored."""
        ...

    def reflog(self, name: str) -> list[ReflogEntry]:
        """Every move of ref `name`, oldest first (empty for a ref never moved)."""
        ...

    # leases -------------------------------------------------------------------------------------

    def acquire_lease(self, pin: bytes | None = None) -> bytes:
        """A writer's lease (gc refuses while it lives) or, with `pin`, a reader's lease on that
        snapshot (gc keeps it); SnapshotNotFound when `pin` is not stored. Returns the lease id."""
        ...

    def release_lease(self, lease_id: bytes) -> None: ...

    def leases(self) -> list[Lease]:
        """Every lease recorded, live or stale."""
        ...

    def pinned_snapshots(self) -> set[bytes]:
        """Snapshots live readers have pinned: roots for gc, like refs."""
        ...

    # housekeeping -------------------------------------------------------------------------------

    def roots_fingerprint(self) -> Fingerprint:
        """Refs and the reflog's length: if either changes, a gc plan made before is stale."""
        ...

    def collect(
        self, snapshot_ids: list[bytes], chunk_keys: list[ChunkKey], fingerprint: Fingerprint
    ) -> None:
        """Delete unreachable snapshots and chunks, unless a live writer holds a lease, a reader
        pins a doomed snapshot, or the roots no longer match `fingerprint` (all raise WriterActive
        and delete nothing). Stale leases are removed on the way."""
        ...

    def usage(self) -> dict[str, int]:
        """`file_bytes` (what the store occupies); with `capabilities.memory_map` also `map_size`,
        `map_used`, `reader_slots`, `max_readers` and `stale_readers_cleared`."""
        ...

    def stat(self) -> dict[str, int]:
        """Entry counts (`chunks`, `snapshots`, `refs`, `reflog`, ...) and `file_bytes`."""
        ...

    def meta_int(self, name: str) -> int | None:
        """A creation parameter (such as `chunk_size`), or None for stores made without it."""
        ...

    def close(self) -> None: ...


class StoreBase:
    """The members every backend derives the same way from the others (written once, here)."""

    def get_many(self: Any, keys: Iterable[ChunkKey]) -> Iterator[bytes]:
        """Values in order, overlapped as far as the backend's `map_ordered` overlaps them."""
        return self.map_ordered(self.get, keys)

    def contains(self: Any, keys: Iterable[ChunkKey]) -> set[ChunkKey]:
        return set(self.stored_sizes(keys))

    def pinned_snapshots(self: Any) -> set[bytes]:
        return {lease.pin for lease in self.leases() if lease.pin and not lease.stale}

    def _allow_deltas_for(self: Any, values: Iterable[bytes | memoryview]) -> None:
        """Mark the store /3 (`allow_deltas`) when `values`, a batch about to be written, brings
        a delta chunk: what every backend's `put_batch` does first."""
        if any(is_delta_value(value) for value in values):
            self.allow_deltas()

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]

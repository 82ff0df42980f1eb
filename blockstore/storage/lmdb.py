"""The LMDB store: one environment, five named sub-databases, and the write-ordering rules.

Layout: `chunks` (key → stored chunk value), `snapshots` (id → canonical snapshot bytes), `refs`
(name → snapshot id), `reflog` (name NUL seq → entry), `meta` (format version, creation params).
Each batch of writes is one transaction. Callers write chunks, then the snapshot, then move the ref
with compare-and-set (the ref and its reflog entry in one transaction), so a crash leaves at worst
unreferenced chunks, never a ref that points at something missing.

`map_size` is set explicitly and doubled when a write fills it. LMDB allows changing it only while
no transaction of this process is open, and a process may have many threads reading one store (the
runtime's decode threads through a read-through cache): every transaction therefore passes a
per-environment `_ResizeGate`, and the map is grown only once every open transaction has ended.

Leases (in `meta`) tell `gc` who is using the store: a writer's lease (pack, apply) stops gc
altogether, since its chunks are not referenced yet; a reader's lease *pins* the one snapshot it
reads (the lazy runtime), so gc keeps it and its chunks. A lease of a dead process on this host is
stale: ignored, reported by `doctor`, and removed by the next gc.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import lmdb

from blockstore.core.hashing import ChunkKey
from blockstore.errors import (
    BlockstoreError,
    ChunkMissing,
    EnvironmentFailure,
    InvalidArgument,
    RefConflict,
    SnapshotNotFound,
    StoreCorrupt,
    StoreExists,
    StoreFormatMismatch,
    StoreNotFound,
    WriterActive,
)
from blockstore.files import ENVIRONMENT_CAUSES, fsync_directory
from blockstore.storage.base import (
    Capabilities,
    Fingerprint,
    Lease,
    ReflogEntry,
    StoreBase,
    blocking_leases,
    process_alive,
    short_id,
)
from blockstore.storage.faults import crash_point

STORE_FORMAT = "blockstore-lmdb/2"
DELTA_FORMAT = "blockstore-lmdb/3"
READABLE_FORMATS = ("blockstore-lmdb/1", STORE_FORMAT, DELTA_FORMAT)
"""/1 holds chunk values in plain msgpack only; /2 may also hold framed ones (FORMAT.md §1), which
older readers cannot decode. A /1 store becomes /2 in the transaction of its first chunk write.
/3 may also hold delta chunks: a store becomes /3 (`allow_deltas`) before its first one is written."""
INITIAL_MAP_SIZE = 1 << 30
MAX_READERS = 256
_DB_NAMES = (b"chunks", b"snapshots", b"refs", b"reflog", b"meta")
_LEASE_PREFIX = b"lease/"
_BUILD_MARK = ".creating-"
"""Directories `create` builds a store in are named `<prefix>.creating-<host>-<pid>-<random>`."""
_T = TypeVar("_T")


class _ResizeGate:
    """Transactions share the gate; a map resize takes it alone, once every transaction open in
    this process has ended (LMDB forbids `mdb_env_set_mapsize` beside a live transaction: a write
    then fails with EINVAL, reads may see unmapped pages).

    A waiting resize holds back new transactions, so a stream of overlapping reads cannot starve
    it; a thread already inside a transaction may open another (nesting never deadlocks)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._open = 0
        self._resizing = False
        self._waiting = 0
        self._depth = threading.local()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        depth = getattr(self._depth, "value", 0)
        if depth == 0:
            with self._condition:
                while self._resizing or self._waiting:
                    self._condition.wait()
                self._open += 1
        self._depth.value = depth + 1
        try:
            yield
        finally:
            self._depth.value = depth
            if depth == 0:
                with self._condition:
                    self._open -= 1
                    if self._open == 0:
                        self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        if getattr(self._depth, "value", 0):
            raise RuntimeError("an LMDB map cannot be resized from inside a transaction")
        with self._condition:
            self._waiting += 1
            try:
                while self._open or self._resizing:
                    self._condition.wait()
            finally:
                self._waiting -= 1
            self._resizing = True
        try:
            yield
        finally:
            with self._condition:
                self._resizing = False
                self._condition.notify_all()


@dataclass
class _SharedEnv:
    """One process's handle on one store's environment, shared by every LmdbStore on that path."""

    env: lmdb.Environment
    dbs: dict[str, lmdb._Database]
    readonly: bool
    stale_readers_cleared: int
    lock_file: tuple[int, int] | None
    """(st_dev, st_ino) of the lock.mdb this environment locks through; None without one."""
    users: int = 0
    gate: _ResizeGate = field(default_factory=_ResizeGate)


_SHARED: dict[tuple[int, str], _SharedEnv] = {}
_SHARED_LOCK = threading.Lock()


_INHERITED: set[str] = set()
"""Stores a parent process had open when this process was forked from it."""


def _forget_parent_environments() -> None:
    """In a forked child, drop the parent's environments without using or closing them: an LMDB
    handle must not cross fork(), and closing the child's copy would free the parent's reader
    slots under it. py-lmdb refuses to open those files again in this process while the copy
    exists, so a store the parent had open cannot be used here (see `_open_lmdb`)."""
    global _SHARED_LOCK
    _INHERITED.update(path for _, path in _SHARED)
    _SHARED.clear()
    _SHARED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_parent_environments)


class LmdbStore(StoreBase):
    """A blockstore on one LMDB environment (a directory holding data.mdb and lock.mdb)."""

    capabilities = Capabilities(
        zero_copy_values=True, memory_map=True, conditional_writes=True, concurrency=1
    )

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._pid = -1
        self._key: tuple[int, str] | None = None
        self._deltas_allowed = False
        self._open_env()

    @classmethod
    def create(cls, path: Path, params: dict[str, int] | None = None) -> LmdbStore:
        """Create an empty store with creation `params` in `meta`; refuses a non-empty path.

        Atomic, so a killed init leaves either nothing or a whole store, never a data.mdb without
        its sub-databases (which no command could open and init would refuse): the environment is
        built in a temporary directory and appears in one step. A new path is that directory
        renamed into place; an existing empty directory (perhaps a mount point, or one whose owner
        and mode the user chose) is kept, and the finished data.mdb is hard-linked into it, which
        fails if another init got there first. Build directories of dead processes are removed."""
        try:
            if path.is_dir():
                _remove_abandoned_builds(path, _BUILD_MARK)
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise StoreExists(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                cls._create_inside(path, params)
            else:
                cls._create_beside(path, params)
        except OSError as exc:
            raise _os_failure(f"store {path}", exc, "creating it") from None
        return cls(path)

    @classmethod
    def _create_beside(cls, path: Path, params: dict[str, int] | None) -> None:
        prefix = f".{path.name}{_BUILD_MARK}"
        _remove_abandoned_builds(path.parent, prefix)
        building = Path(tempfile.mkdtemp(prefix=f"{prefix}{_build_owner()}-", dir=path.parent))
        try:
            _build_environment(building, params)
            try:
                os.rename(building, path)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise StoreExists(path) from None
                raise
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        fsync_directory(path.parent)

    @classmethod
    def _create_inside(cls, path: Path, params: dict[str, int] | None) -> None:
        building = Path(tempfile.mkdtemp(prefix=f"{_BUILD_MARK}{_build_owner()}-", dir=path))
        try:
            _build_environment(building, params)
            try:
                os.link(building / "data.mdb", path / "data.mdb")
            except FileExistsError:
                raise StoreExists(path) from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                # A filesystem without hard links: rename, checking first (a narrow race remains).
                if (path / "data.mdb").exists():
                    raise StoreExists(path) from None
                os.rename(building / "data.mdb", path / "data.mdb")
            fsync_directory(path)
        finally:
            shutil.rmtree(building, ignore_errors=True)

    @property
    def stale_readers_cleared(self) -> int:
        """LMDB reader slots of dead processes that opening this environment cleared."""
        return self._shared().stale_readers_cleared

    def _shared(self) -> _SharedEnv:
        self.env  # noqa: B018 - in a forked child, joins (or refuses) this process's own environment
        assert self._key is not None, "store is closed"
        return _SHARED[self._key]

    def _open_env(self) -> None:
        """Join this process's environment for the path, opening it first if needed: LMDB forbids
        opening one environment twice in a process, and a program may hold a writer and a lazy
        reader on the same store."""
        key = (os.getpid(), os.path.realpath(self.path))
        with _SHARED_LOCK:
            shared = _SHARED.get(key)
            if shared is None:
                shared = _SHARED[key] = _SharedEnv(*self._open_lmdb())
            elif shared.readonly and not self.readonly:
                raise InvalidArgument(f"store {self.path} is already open read-only in this process")
            shared.users += 1
        self._env, self._dbs, self._key, self._gate = shared.env, shared.dbs, key, shared.gate
        self._pid = os.getpid()

    def _open_lmdb(
        self,
    ) -> tuple[lmdb.Environment, dict[str, lmdb._Database], bool, int, tuple[int, int] | None]:
        if not (self.path / "data.mdb").is_file():
            raise StoreNotFound(self.path, self.path)
        try:
            _check_data_file(self.path)
            size = (self.path / "data.mdb").stat().st_size
        except OSError as exc:
            raise _os_failure(f"store {self.path}", exc, "reading data.mdb") from None
        try:
            env = self._lmdb_environment(size, lock=True)
        except lmdb.Error as exc:
            if os.path.realpath(self.path) in _INHERITED:
                raise InvalidArgument(
                    f"store {self.path} was open in the parent when this process was forked, and LMDB "
                    "handles cannot cross fork(): open it only in processes started after that "
                    "(or with the 'spawn' start method)"
                ) from None
            if not (self.readonly and _errno_of(exc) in (errno.EACCES, errno.EPERM, errno.EROFS)):
                raise _lmdb_failure(self.path, exc, "opening it", writing=not self.readonly) from None
            # A reader without write access to lock.mdb (or its directory) opens without the lock
            # file; see `lockless`.
            try:
                env = self._lmdb_environment(size, lock=False)
            except lmdb.Error as exc:
                raise _lmdb_failure(self.path, exc, "opening it without lock.mdb", writing=False) from None
        lock_file = None
        try:
            if env.flags()["lock"] and not self.readonly:
                lock_stat = os.stat(self.path / "lock.mdb")
                lock_file = (lock_stat.st_dev, lock_stat.st_ino)
            # Reader slots of killed processes pin old pages forever (the file only grows); clear them.
            stale = env.reader_check()
            dbs = {name.decode(): env.open_db(name, create=False) for name in _DB_NAMES}
            with env.begin(db=dbs["meta"]) as txn:
                found = txn.get(b"format")
            found_format = bytes(found).decode(errors="replace") if found is not None else None
            if found_format not in READABLE_FORMATS:
                raise StoreFormatMismatch(self.path, found_format, " or ".join(READABLE_FORMATS))
            self._deltas_allowed = found_format == DELTA_FORMAT
        except lmdb.Error as exc:
            env.close()
            raise _lmdb_failure(self.path, exc, "opening it", writing=False) from None
        except OSError as exc:
            env.close()
            raise _os_failure(f"store {self.path}", exc, "opening lock.mdb") from None
        except BaseException:
            env.close()
            raise
        return env, dbs, self.readonly, stale, lock_file

    def _lmdb_environment(self, size: int, *, lock: bool) -> lmdb.Environment:
        return lmdb.open(
            str(self.path),
            map_size=max(INITIAL_MAP_SIZE, 2 * size),
            max_dbs=len(_DB_NAMES),
            max_readers=MAX_READERS,
            create=False,
            readonly=self.readonly,
            lock=lock,
            # Chunk values are MiBs of contiguous overflow pages read front to back: without
            # the kernel's readahead a cold read faults 4 KiB at a time, several times slower.
            readahead=True,
        )

    @property
    def lockless(self) -> bool:
        """Opened read-only without lock.mdb, because this process may not write to it (a store
        on a read-only mount, or one whose files it may only read). Such a reader takes no reader
        slot, so a writer elsewhere does not know it is there and may reuse pages it is still
        reading: a long read can meet a later write's bytes. Every chunk is checked against its
        key, so that surfaces as damage and never as wrong weights; reopening reads the new state."""
        return not self.env.flags()["lock"]

    def meta_int(self, name: str) -> int | None:
        """A creation parameter recorded at `create`, or None for stores made without it."""
        with self._begin("meta") as txn:
            value = txn.get(name.encode())
        return int(value) if value is not None else None

    @property
    def env(self) -> lmdb.Environment:
        """The environment; in a forked child, this process's own (see `_forget_parent_environments`)."""
        if self._pid != os.getpid():
            self._open_env()
        return self._env

    @overload
    def _begin(
        self,
        db: str | None = None,
        *,
        write: bool = False,
        buffers: Literal[False] = False,
        doing: str | None = None,
    ) -> AbstractContextManager[lmdb.Transaction[bytes]]: ...
    @overload
    def _begin(
        self, db: str | None = None, *, write: bool = False, buffers: Literal[True], doing: str | None = None
    ) -> AbstractContextManager[lmdb.Transaction[memoryview]]: ...
    @contextmanager
    def _begin(
        self, db: str | None = None, *, write: bool = False, buffers: bool = False, doing: str | None = None
    ) -> Iterator[lmdb.Transaction[Any]]:  # Any: bytes or memoryview values, per the overloads
        """A transaction (committed when the block ends normally, aborted otherwise), inside this
        environment's resize gate. Adopts a map another process has grown meanwhile (a long-lived
        reader such as the lazy runtime would otherwise fail on its next read after a pack). Any
        LMDB error inside it, or from its commit, becomes a blockstore error (`_lmdb_failure`)
        saying what was being done: `doing`, or reading/writing `db`."""
        doing = doing or (f"writing {db or 'the store'}" if write else f"reading {db or 'the catalog'}")
        env = self.env  # first: after a fork it reopens, and the database handles with it
        handle = self._dbs[db] if db else None
        if write:
            self._check_lock_file()
        while True:
            with self._gate.transaction():
                try:
                    # Two calls: py-lmdb's stubs type the buffers=True and False cases apart, with
                    # no overload for a plain bool.
                    txn = (
                        env.begin(db=handle, write=write, buffers=True)
                        if buffers
                        else env.begin(db=handle, write=write)
                    )
                except lmdb.MapResizedError:
                    txn = None
                except lmdb.Error as exc:
                    raise _lmdb_failure(self.path, exc, doing, writing=write) from None
                if txn is not None:
                    with _Transaction(self.path, txn, doing, write) as inner:
                        yield inner
                    return
            self._resize(0)

    def _resize(self, size: int, *, seen: int | None = None) -> None:
        """Set the map size (0: adopt the size another process set) once no transaction of this
        process is open; `seen`: skip it if the map already grew past that meanwhile."""
        with self._gate.exclusive():
            if seen is None or self.env.info()["map_size"] <= seen:
                self.env.set_mapsize(size)

    def _check_lock_file(self) -> None:
        """Refuse to write once lock.mdb is not the file this environment locks through: someone
        removed or replaced it, so a writer that opened the store since holds its write lock in
        another file, and two writers at once would lose data."""
        expected = self._shared().lock_file
        if expected is None:
            return
        try:
            current = os.stat(self.path / "lock.mdb")
            found: tuple[int, int] | None = (current.st_dev, current.st_ino)
        except FileNotFoundError:
            found = None
        if found != expected:
            raise EnvironmentFailure(
                f"store {self.path}",
                "lock.mdb was removed or replaced while this process had the store open, so another "
                "writer may not see this one's lock; refusing to write (nothing was written: run the "
                "command again)",
            )

    def close(self) -> None:
        """Leave the shared environment; the last user of it in this process closes it."""
        if self._key is None:
            return
        with _SHARED_LOCK:
            shared = _SHARED.get(self._key)
            if shared is not None:
                shared.users -= 1
                if shared.users == 0:
                    del _SHARED[self._key]
                    shared.env.close()
        self._key = None

    def _write(self, step: str, body: Callable[[lmdb.Transaction[bytes]], _T]) -> _T:
        """Run `body` in one write transaction, doubling map_size and retrying when it fills.
        `step` names the transaction's crash points (see `blockstore.storage.faults`)."""
        while True:
            seen = self.env.info()["map_size"]
            try:
                with self._begin(write=True, doing=f"writing the {step} transaction") as txn:
                    result = body(txn)
                    crash_point(f"{step}.before-commit")
            except lmdb.MapFullError:
                self._resize(2 * seen, seen=seen)
                continue
            crash_point(f"{step}.committed")
            return result

    # chunks ---------------------------------------------------------------------------------------

    def get(self, key: ChunkKey) -> bytes:
        return self.with_value(key, bytes)

    def with_value(self, key: ChunkKey, use: Callable[[bytes | memoryview], _T]) -> _T:
        """`use(value)` for the chunk `key`, the value a view of the memory map valid only during
        the call: a decoder reads it where it lies, with no copy of the stored bytes."""
        with self._begin("chunks", buffers=True, doing=f"reading chunk {key.hex()}") as txn:
            value = txn.get(key)
            if value is None:
                raise ChunkMissing(key.hex())
            return use(value)

    def value_start(self, key: ChunkKey, length: int) -> bytes:
        return self.with_value(key, lambda value: bytes(value[:length]))

    def map_ordered(self, function: Callable[[Any], _T], items: Iterable[Any]) -> Iterator[_T]:
        """`function` over `items`, lazily and in order (the object store overlaps them)."""
        return (function(item) for item in items)

    def stored_sizes(self, keys: Iterable[ChunkKey]) -> dict[ChunkKey, int]:
        sizes = {}
        with self._begin("chunks", buffers=True) as txn:
            for key in keys:
                value = txn.get(key)
                if value is not None:
                    sizes[key] = len(value)
        return sizes

    @property
    def deltas_allowed(self) -> bool:
        """Marked format /3: the store may hold delta chunks (see `allow_deltas`). Read afresh
        until it is seen set (it is never unset): another process, or another handle on the same
        environment in this one, may have written the first delta since this one opened, and gc
        must not miss the bases that delta needs."""
        if not self._deltas_allowed:
            with self._begin("meta") as txn:
                self._deltas_allowed = txn.get(b"format") == DELTA_FORMAT.encode()
        return self._deltas_allowed

    def allow_deltas(self) -> None:
        def body(txn: lmdb.Transaction[bytes]) -> None:
            if txn.get(b"format", db=self._dbs["meta"]) != DELTA_FORMAT.encode():
                txn.put(b"format", DELTA_FORMAT.encode(), db=self._dbs["meta"])

        if not self._deltas_allowed:
            self._write("chunks", body)
            self._deltas_allowed = True

    def put_batch(self, items: Iterable[tuple[ChunkKey, bytes | memoryview]]) -> int:
        """Insert chunks that are not there yet, in one transaction; returns bytes newly written.
        A value may be any buffer (the read-through cache writes GET bodies as they came). A
        batch that brings a delta chunk marks the store /3 first (`allow_deltas`)."""
        pending = list(items)
        self._allow_deltas_for(value for _, value in pending)

        def body(txn: lmdb.Transaction[bytes]) -> int:
            if txn.get(b"format", db=self._dbs["meta"]) == READABLE_FORMATS[0].encode():
                txn.put(b"format", STORE_FORMAT.encode(), db=self._dbs["meta"])
            written = 0
            for key, value in pending:
                if txn.put(key, value, db=self._dbs["chunks"], overwrite=False):
                    written += len(value)
            return written

        return self._write("chunks", body)

    def delete_batch(self, keys: Iterable[ChunkKey]) -> int:
        doomed = list(keys)
        return self._write("gc", lambda txn: sum(txn.delete(key, db=self._dbs["chunks"]) for key in doomed))

    def iter_keys(self) -> Iterator[ChunkKey]:
        with self._begin("chunks") as txn:
            keys = list(txn.cursor().iternext(keys=True, values=False))
        return iter(keys)

    # snapshots ------------------------------------------------------------------------------------

    def get_snapshot_bytes(self, snapshot_id: bytes) -> bytes | None:
        with self._begin("snapshots") as txn:
            return txn.get(snapshot_id)

    def put_snapshot(self, snapshot_id: bytes, data: bytes) -> None:
        self._write(
            "snapshot", lambda txn: txn.put(snapshot_id, data, db=self._dbs["snapshots"], overwrite=False)
        )

    def snapshot_ids(self) -> list[bytes]:
        with self._begin("snapshots") as txn:
            return list(txn.cursor().iternext(keys=True, values=False))

    # refs and reflog ------------------------------------------------------------------------------

    def _refs_in(self, txn: lmdb.Transaction[bytes]) -> dict[str, bytes]:
        return {key.decode(): value for key, value in txn.cursor(db=self._dbs["refs"])}

    def refs(self) -> dict[str, bytes]:
        with self._begin() as txn:
            return self._refs_in(txn)

    def get_ref(self, name: str) -> bytes | None:
        with self._begin("refs") as txn:
            return txn.get(name.encode())

    def move_ref(self, name: str, new: bytes, expected: bytes | None, op: str, message: str) -> None:
        """Point `name` at `new` if it still points at `expected`; log the move in the same txn."""

        def body(txn: lmdb.Transaction[bytes]) -> None:
            current = txn.get(name.encode(), db=self._dbs["refs"])
            if current != expected:
                raise RefConflict(name, short_id(expected), short_id(current))
            if txn.get(new, db=self._dbs["snapshots"]) is None:
                raise StoreCorrupt(
                    self.path, f"refusing to point ref {name!r} at absent snapshot {new.hex()}"
                )
            txn.put(name.encode(), new, db=self._dbs["refs"])
            prefix = name.encode() + b"\0"
            seq = 0
            last_key = _last_with_prefix(txn, self._dbs["reflog"], prefix)
            if last_key is not None:
                seq = struct.unpack(">Q", last_key[len(prefix) :])[0] + 1
            entry = ReflogEntry(time.time_ns(), expected, new, op, message)
            txn.put(prefix + struct.pack(">Q", seq), entry.to_bytes(), db=self._dbs["reflog"])

        self._write("ref", body)

    def reflog(self, name: str) -> list[ReflogEntry]:
        prefix = name.encode() + b"\0"
        entries = []
        with self._begin("reflog") as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    entries.append(ReflogEntry.from_bytes(value))
        return entries

    # leases and garbage collection ----------------------------------------------------------------

    def acquire_lease(self, pin: bytes | None = None) -> bytes:
        """Announce a writer (pack, apply: gc must leave its not-yet-referenced data alone) or, with
        `pin`, a reader of that snapshot (gc must keep it). A pin is taken only on a snapshot that
        is still there, checked in the same transaction; raises SnapshotNotFound otherwise."""
        lease_id = os.urandom(8)
        record = Lease.record(pin)

        def body(txn: lmdb.Transaction[bytes]) -> None:
            if pin is not None and txn.get(pin, db=self._dbs["snapshots"]) is None:
                raise SnapshotNotFound(pin.hex(), self.path)
            txn.put(_LEASE_PREFIX + lease_id, record, db=self._dbs["meta"])

        self._write("lease", body)
        return lease_id

    def release_lease(self, lease_id: bytes) -> None:
        self._write("unlease", lambda txn: txn.delete(_LEASE_PREFIX + lease_id, db=self._dbs["meta"]))

    def _leases_in(self, txn: lmdb.Transaction[bytes]) -> list[Lease]:
        leases = []
        cursor = txn.cursor(db=self._dbs["meta"])
        if cursor.set_range(_LEASE_PREFIX):
            for key, value in cursor:
                if not key.startswith(_LEASE_PREFIX):
                    break
                leases.append(Lease.from_record(key[len(_LEASE_PREFIX) :], value))
        return leases

    def leases(self) -> list[Lease]:
        """Every lease recorded, live or stale."""
        with self._begin() as txn:
            return self._leases_in(txn)

    def _fingerprint_in(self, txn: lmdb.Transaction[bytes]) -> Fingerprint:
        return self._refs_in(txn), txn.stat(self._dbs["reflog"])["entries"]

    def roots_fingerprint(self) -> Fingerprint:
        """Refs and the reflog's length: if either changes, a gc plan made before is stale."""
        with self._begin() as txn:
            return self._fingerprint_in(txn)

    def collect(
        self, snapshot_ids: list[bytes], chunk_keys: list[ChunkKey], fingerprint: Fingerprint
    ) -> None:
        """Delete unreachable snapshots and chunks in one transaction, unless a writer is active,
        the refs moved since the plan was made, or a reader pinned a doomed snapshot meanwhile (all
        raise WriterActive and delete nothing). Stale leases are removed in the same transaction."""
        doomed = set(snapshot_ids)

        def body(txn: lmdb.Transaction[bytes]) -> None:
            leases = self._leases_in(txn)
            blocking = blocking_leases(leases, doomed)
            if blocking:
                raise WriterActive(self.path, "; ".join(lease.describe() for lease in blocking))
            if self._fingerprint_in(txn) != fingerprint:
                raise WriterActive(self.path, "refs moved while gc was planning")
            for lease in leases:
                if lease.stale:
                    txn.delete(_LEASE_PREFIX + lease.lease_id, db=self._dbs["meta"])
            for snapshot_id in snapshot_ids:
                txn.delete(snapshot_id, db=self._dbs["snapshots"])
            for key in chunk_keys:
                txn.delete(key, db=self._dbs["chunks"])

        self._write("gc", body)

    def usage(self) -> dict[str, int]:
        """How full the map is and how many LMDB reader slots are taken (for `doctor`); slots of
        dead processes are cleared when the environment is opened (`stale_readers_cleared`)."""
        env = self.env
        info, page_size = env.info(), env.stat()["psize"]
        # One line per reader slot held by a live process, after a header line (or a "no" line).
        slots = [line for line in env.readers().splitlines()[1:] if line.strip()]
        return {
            "map_size": info["map_size"],
            "map_used": (info["last_pgno"] + 1) * page_size,
            "file_bytes": (self.path / "data.mdb").stat().st_size,
            "reader_slots": len(slots),
            "max_readers": info["max_readers"],
            "stale_readers_cleared": self.stale_readers_cleared,
        }

    def stat(self) -> dict[str, int]:
        """Entry counts per sub-database and the size of the data file."""
        with self._begin() as txn:
            counts = {name: txn.stat(db)["entries"] for name, db in self._dbs.items()}
        counts["file_bytes"] = (self.path / "data.mdb").stat().st_size
        return counts


def _last_with_prefix(txn: lmdb.Transaction[bytes], db: lmdb._Database, prefix: bytes) -> bytes | None:
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix + b"\xff" * 9):
        if not cursor.last():
            return None
    elif not cursor.prev():
        return None
    key = cursor.key()
    return key if key.startswith(prefix) else None


# creating a store atomically ------------------------------------------------------------------------


def _build_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_abandoned_builds(directory: Path, prefix: str) -> None:
    """Remove `create`'s build directories in `directory` left by killed processes on this host
    (named `<prefix><host>-<pid>-<random>`); live ones, and other hosts' ones, are left alone."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        owner, _, _random = entry.name[len(prefix) :].rpartition("-")
        host, _, pid = owner.rpartition("-")
        if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _build_environment(directory: Path, params: dict[str, int] | None) -> None:
    """A complete, empty store in `directory`: every sub-database, the format and `params`, synced."""
    env = lmdb.open(str(directory), map_size=INITIAL_MAP_SIZE, max_dbs=len(_DB_NAMES), create=True)
    try:
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn)
            for name in _DB_NAMES:
                env.open_db(name, txn=txn)
            txn.put(b"format", STORE_FORMAT.encode(), db=meta)
            txn.put(b"created_ns", str(time.time_ns()).encode(), db=meta)
            for param, value in (params or {}).items():
                txn.put(param.encode(), str(value).encode(), db=meta)
        env.sync(True)
    finally:
        env.close()
    fsync_directory(directory)


# checking data.mdb before it is mapped ----------------------------------------------------------

# LMDB's file starts with two meta pages. Each is a 16-byte page header (pgno, pad, flags, lower,
# upper) and then MDB_meta: magic u32, version u32, address, mapsize, two MDB_db records of 48
# bytes (the first one's leading u32 holds the page size), last used page number, txn id — all
# native-endian, 64-bit words on 64-bit hosts. LMDB uses the meta with the larger txn id.
_META_MAGIC = 0xBEEFC0DE
_META = struct.Struct("=QHHHHIIQQIHH40x48xQQ")
_MIN_PAGE, _MAX_PAGE = 512, 1 << 16


def _check_data_file(path: Path) -> None:
    """Refuse a data.mdb shorter than the pages its own meta page says are in use. Mapping such a
    file and reading past its end kills the process with SIGBUS, no message; a file cut short
    (a failed copy, a full disk during rsync) must instead be named as damaged, exit 4.

    Meta pages are read before the size is taken: a writer writes its pages before the meta that
    counts them, so a size taken after never undercounts a concurrent commit."""
    data_file = path / "data.mdb"
    metas = []
    with open(data_file, "rb") as handle:
        first = handle.read(_META.size)
        page_size = _META.unpack(first)[9] if len(first) == _META.size else 0
        if _MIN_PAGE <= page_size <= _MAX_PAGE:
            handle.seek(page_size)
            second = handle.read(_META.size)
            for page in (first, second):
                if len(page) == _META.size:
                    fields = _META.unpack(page)
                    if fields[5] == _META_MAGIC:
                        metas.append(fields)
    size = os.stat(data_file).st_size
    if not metas:
        if size < 2 * _MIN_PAGE:
            raise StoreCorrupt(path, f"data.mdb is {size} bytes, too short to hold LMDB's meta pages")
        return  # not LMDB's layout as this host writes it: LMDB itself will say what is wrong
    if size < 2 * page_size:
        raise StoreCorrupt(path, f"data.mdb is truncated: {size} bytes, shorter than its two meta pages")
    newest = max(metas, key=lambda fields: fields[-1])
    last_page = newest[-2]
    needed = (last_page + 1) * page_size
    if size < needed:
        raise StoreCorrupt(
            path,
            f"data.mdb is truncated: {size} bytes, but its meta page counts {last_page + 1} pages of "
            f"{page_size} bytes ({needed} bytes) in use",
        )


# LMDB and OS errors into the hierarchy ----------------------------------------------------------

_ENVIRONMENT_ERRNOS = {
    **ENVIRONMENT_CAUSES,
    errno.ENOMEM: "out of memory",
    errno.EAGAIN: "the store is locked by another process",
}
_ENVIRONMENT_CLASSES = (
    lmdb.DiskError,
    lmdb.ReadonlyError,
    lmdb.MemoryError,
    lmdb.LockError,
    lmdb.ReadersFullError,
    lmdb.TlsFullError,
    lmdb.MapFullError,
)
_NEARLY_FULL = 16 << 20
"""Below this much free space, an I/O error on a write is taken for a full disk: LMDB reports a
short write (the filesystem filling up mid-page) as EIO, not ENOSPC."""


def _os_failure(what: str, exc: OSError, doing: str) -> BlockstoreError:
    cause = _ENVIRONMENT_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
    return EnvironmentFailure(what, f"{cause} while {doing}")


def _errno_of(exc: lmdb.Error) -> int | None:
    """The errno behind an LMDB error: py-lmdb keeps only the message, which ends in strerror."""
    message = str(exc)
    for number in _ENVIRONMENT_ERRNOS:
        if message.endswith(os.strerror(number)):
            return number
    return None


def _lmdb_failure(path: Path, exc: lmdb.Error, doing: str, *, writing: bool) -> BlockstoreError:
    """One LMDB error as a blockstore error: the environment's fault (exit 8) when it is about
    space, permissions, locks or I/O, and damage to the store (exit 4) for everything else."""
    number = _errno_of(exc)
    if number is None and not isinstance(exc, _ENVIRONMENT_CLASSES):
        return StoreCorrupt(path, f"LMDB failed {doing} ({exc})")
    cause = _ENVIRONMENT_ERRNOS.get(number or 0, str(exc))
    if writing and number in (errno.EIO, errno.ENOSPC):
        try:
            stats = os.statvfs(path)
        except OSError:
            stats = None
        if stats is not None and stats.f_bavail * stats.f_frsize < _NEARLY_FULL:
            free = stats.f_bavail * stats.f_frsize
            cause = f"no space left on device ({free} bytes free; LMDB reported {exc})"
    committed = "; nothing of this write was committed" if writing else ""
    return EnvironmentFailure(f"store {path}", f"{cause} while {doing}{committed}")


class _Transaction:
    """An LMDB transaction as a context manager that turns LMDB errors raised inside it, or by its
    commit, into blockstore errors: the one place where store operations' LMDB errors are mapped.
    MapFullError, raised inside or by the commit, passes through untouched, for `_write` to grow
    the map and retry."""

    __slots__ = ("_doing", "_path", "_txn", "_write")

    def __init__(self, path: Path, txn: lmdb.Transaction, doing: str, write: bool) -> None:
        self._path, self._txn, self._doing, self._write = path, txn, doing, write

    def __enter__(self) -> lmdb.Transaction:
        return self._txn

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, traceback: Any) -> None:
        try:
            self._txn.__exit__(kind, exc, traceback)
        except lmdb.MapFullError:
            raise  # a commit can fill the map too (its freelist pages): `_write` grows it and retries
        except lmdb.Error as failure:
            raise _lmdb_failure(self._path, failure, self._doing, writing=self._write) from None
        if isinstance(exc, lmdb.Error) and not isinstance(exc, lmdb.MapFullError):
            raise _lmdb_failure(self._path, exc, self._doing, writing=self._write) from None

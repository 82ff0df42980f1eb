"""A local read-through cache in front of an object store: each host fetches a chunk once.

The cache is an ordinary LMDB store directory holding chunk values only. A chunk read goes to the
cache first and to the object store on a miss, and is kept; every other member of the contract
(snapshots, refs, writes, leases) is `StoreWrapper`'s, forwarded straight to the object store, so
the cache never decides what a ref points at.
Cached values get the same checks as remote ones (each decoded chunk must hash to its key), so a
damaged cache entry is reported like damaged storage. The cache stays under `budget` bytes of chunk
values by evicting arbitrary entries (keys are hashes, so LMDB key order is effectively random).

Writes are behind the reads (`_WriteBehind`): a fetched value is handed to the reader at once and
written to the cache by one background thread, many values to a transaction. Written inline, each
value was its own transaction and fdatasync on a decode thread, which made filling an empty cache
cost up to three quarters of a cold load on a fast link. A value waiting to be written is served
from memory; at most `WRITE_BEHIND_BYTES` wait, beyond that a reader waits for the writer (the
cache is then the bottleneck, and holding more would only grow memory). `flush()` and `close()`
write everything pending. A cache write that fails (a full disk) stops caching for this process,
says so once on stderr, and never fails a read: the object store still has every value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from blockstore.core.hashing import ChunkKey
from blockstore.errors import ChunkMissing, StoreExists
from blockstore.storage.base import Capabilities, Store
from blockstore.storage.lmdb import LmdbStore
from blockstore.storage.wrapper import StoreWrapper

_T = TypeVar("_T")
CACHE_ENV = "BLOCKSTORE_CACHE"
CACHE_SIZE_ENV = "BLOCKSTORE_CACHE_SIZE"
DEFAULT_CACHE_BYTES = 20 << 30
WRITE_BEHIND_BYTES = 128 << 20
"""Stored bytes fetched but not yet in the cache, at most (see the module docstring)."""
_BATCH_BYTES = 64 << 20
"""Values per cache transaction, at most this many bytes (one fdatasync each)."""
Value = bytes | memoryview


class _WriteBehind:
    """Values waiting for the cache, and the one thread that writes them in batches.

    Started on first use and afresh in a forked child (threads do not survive fork; a child
    forgets what its parent had pending: the parent writes it)."""

    def __init__(
        self, local: LmdbStore, store: Callable[[list[tuple[ChunkKey, Value]]], None], limit: int, batch: int
    ) -> None:
        self._local = local
        self._store = store
        self.limit = limit
        self._batch = batch
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._condition = threading.Condition()
        self._pending: dict[ChunkKey, Value] = {}
        self._pending_bytes = 0
        self._writing = False
        self._stopped = False
        self._failed = False
        self._thread: threading.Thread | None = None

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._reset()

    def get(self, key: ChunkKey) -> Value | None:
        self._check_fork()
        with self._condition:
            return self._pending.get(key)

    def add(self, key: ChunkKey, value: Value) -> None:
        """Queue `value` for the cache; waits while `limit` bytes are already waiting."""
        self._check_fork()
        with self._condition:
            if self._failed or self._stopped or key in self._pending:
                return
            while self._pending_bytes >= self.limit and not self._failed:
                self._condition.wait()
            self._pending[key] = value
            self._pending_bytes += len(value)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="blockstore-cache-writer", daemon=True)
                self._thread.start()
            self._condition.notify_all()

    def _take(self) -> list[tuple[ChunkKey, Value]] | None:
        """The next batch, once there is one; None when stopped with nothing left."""
        with self._condition:
            while not self._pending and not self._stopped:
                self._condition.wait()
            if not self._pending:
                return None
            batch: list[tuple[ChunkKey, Value]] = []
            size = 0
            for key, value in self._pending.items():
                if batch and size + len(value) > self._batch:
                    break
                batch.append((key, value))
                size += len(value)
            self._writing = True
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._store(batch)
            except Exception as exc:  # the cache is a copy: a failed write must not fail a load
                self._fail(exc)
                return
            with self._condition:
                for key, value in batch:  # served from memory until written, so dropped only now
                    del self._pending[key]
                    self._pending_bytes -= len(value)
                self._writing = False
                self._condition.notify_all()

    def _fail(self, exc: Exception) -> None:
        print(
            f"blockstore: note: read-through cache {self._local.path}: not written to any more ({exc})",
            file=sys.stderr,
        )
        with self._condition:
            self._failed = True
            self._pending.clear()
            self._pending_bytes = 0
            self._writing = False
            self._condition.notify_all()

    def flush(self) -> None:
        """Wait until every value queued so far is in the cache (or caching failed)."""
        self._check_fork()
        with self._condition:
            while (self._pending or self._writing) and not self._failed:
                self._condition.wait()

    def stop(self) -> None:
        """Write what is pending, then end the writer thread."""
        self.flush()
        with self._condition:
            self._stopped = True
            self._condition.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class ReadThroughCache(StoreWrapper):
    """A store (an `ObjectStore`, usually) whose chunk reads are served from a local LMDB cache
    when possible."""

    def __init__(self, remote: Store, directory: Path, budget: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(remote)
        if not (directory / "data.mdb").exists():
            with contextlib.suppress(StoreExists):  # another process made it first: use theirs
                LmdbStore.create(directory).close()
        self.local = LmdbStore(directory)
        self.budget = budget
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._cached_bytes = sum(self.local.stored_sizes(self.local.iter_keys()).values())
        # A batch never exceeds the budget, so making room for it before writing keeps the cache
        # under its budget at every moment, not only after an eviction catches up.
        batch = max(1, min(_BATCH_BYTES, budget // 5))
        self._writer = _WriteBehind(self.local, self._store_batch, WRITE_BEHIND_BYTES, batch)

    @property
    def remote(self) -> Store:
        """The store behind the cache (the one every write and catalog read goes to)."""
        return self.inner

    @property
    def capabilities(self) -> Capabilities:
        """The remote's, except that a cached value is a view of the cache's memory map."""
        return dataclasses.replace(self.inner.capabilities, zero_copy_values=True)

    def get(self, key: ChunkKey) -> bytes:
        return self.with_value(key, bytes)

    def with_value(self, key: ChunkKey, use: Callable[[bytes | memoryview], _T]) -> _T:
        """`use(value)`: a cached value is a view of the cache's memory map (see `LmdbStore`); a
        missing one is fetched, handed over, and written to the cache behind the read."""
        try:
            result = self.local.with_value(key, use)
        except ChunkMissing:
            waiting = self._writer.get(key)
            if waiting is not None:
                self._count(hit=True)
                return use(waiting)
            value = self.remote.with_value(key, self._keepable)
            self._writer.add(key, value)
            self._count(hit=False)
            return use(value)
        self._count(hit=True)
        return result

    def value_start(self, key: ChunkKey, length: int) -> bytes:
        """From the cache when it holds the value (or is about to), else one range request to the
        remote (the start alone is not cached: it is not the value)."""
        try:
            return self.local.value_start(key, length)
        except ChunkMissing:
            waiting = self._writer.get(key)
            if waiting is not None:
                return bytes(waiting[:length])
            return self.remote.value_start(key, length)

    def _keepable(self, value: bytes | memoryview) -> Value:
        """The remote's value as something that outlives the call (a copy only of a map's view)."""
        return bytes(value) if self.inner.capabilities.zero_copy_values else value

    def _count(self, *, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def _store_batch(self, batch: list[tuple[ChunkKey, Value]]) -> None:
        """Write `batch` to the cache after evicting enough that it fits in the budget (a value
        larger than the whole budget is not kept)."""
        batch = [(key, value) for key, value in batch if len(value) <= self.budget]
        incoming = sum(len(value) for _, value in batch)
        if self._cached_bytes + incoming > self.budget:
            self._evict(room=incoming)
        added = self.local.put_batch(batch)
        with self._lock:
            self._cached_bytes += added

    def flush(self) -> None:
        """Wait until every value fetched so far is in the cache."""
        self._writer.flush()

    def bound_pending(self, limit: int) -> None:
        """Hold at most `limit` bytes of fetched values waiting for the cache (plus the one that
        crosses it) instead of `WRITE_BEHIND_BYTES`: a reader with a host-memory budget (the vLLM
        loader) gives the writer its share of it."""
        self._writer.limit = max(1, limit)

    def _evict(self, room: int) -> None:
        """Drop entries until `room` more bytes fit, and the cache is at most 80% of its budget
        (slack, so that not every batch has to evict)."""
        target = min(int(self.budget * 0.8), self.budget - room)
        doomed, freed = [], 0
        sizes = self.local.stored_sizes(self.local.iter_keys())
        for key, size in sizes.items():
            if self._cached_bytes - freed <= target:
                break
            doomed.append(key)
            freed += size
        self.local.delete_batch(doomed)
        with self._lock:
            self._cached_bytes -= freed

    def close(self) -> None:
        try:
            self._writer.stop()
        finally:
            self.local.close()
            self.remote.close()

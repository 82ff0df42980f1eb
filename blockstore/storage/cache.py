"""A local read-through cache in front of an object store: each host fetches a chunk once.

The cache is an ordinary LMDB store directory holding chunk values only. A chunk read goes to the
cache first and to the object store on a miss, and is kept; every other member of the contract
(snapshots, refs, writes, leases) is `StoreWrapper`'s, forwarded straight to the object store, so
the cache never decides what a ref points at.
Cached values get the same checks as remote ones (each decoded chunk must hash to its key), so a
damaged cache entry is reported like damaged storage. The cache stays under `budget` bytes of chunk
values by evicting arbitrary entries (keys are hashes, so LMDB key order is effectively random).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
        """`use(value)`: a cached value is a view of the cache's memory map (see `LmdbStore`)."""
        try:
            result = self.local.with_value(key, use)
        except ChunkMissing:
            value = self.remote.get(key)
            self._keep(key, value)
            with self._lock:
                self.misses += 1
            return use(value)
        with self._lock:
            self.hits += 1
        return result

    def _keep(self, key: ChunkKey, value: bytes) -> None:
        added = self.local.put_batch([(key, value)])
        with self._lock:
            self._cached_bytes += added
            over = self._cached_bytes > self.budget
        if over:
            self._evict()

    def _evict(self) -> None:
        """Drop entries until the cache is at 80% of its budget (room before the next eviction)."""
        target = int(self.budget * 0.8)
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
        self.local.close()
        self.remote.close()

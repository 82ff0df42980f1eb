"""Decoded base chunks of delta chunks, kept in memory for the next delta against the same base.

A delta chunk decodes its base chunk first (FORMAT.md §1), so a process that loads several
fine-tunes of one model decodes every base chunk once per fine-tune. With a cache of N bytes
(`BLOCKSTORE_BASE_CACHE_SIZE`, read at first use; off by default) it decodes each once. Entries are
keyed by store and chunk key and hold the bytes already checked against the key; a process that
turns it on trusts those earlier reads, so `verify` in such a process re-reads no cached base.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from blockstore.core.hashing import ChunkKey
from blockstore.sizes import parse_size

BASE_CACHE_ENV = "BLOCKSTORE_BASE_CACHE_SIZE"
"""Bytes of decoded base chunks a repository keeps (`BaseCache`); default none."""


def base_cache_bytes() -> int:
    """The base cache size `BLOCKSTORE_BASE_CACHE_SIZE` asks for (a size such as 512MiB), or 0.
    A value that is not a size raises InvalidArgument naming the variable."""
    text = os.environ.get(BASE_CACHE_ENV)
    return (parse_size(text, BASE_CACHE_ENV) or 0) if text else 0


class BaseCache:
    """A byte-bounded LRU of decoded base chunks, by store and key, shared by every repository of
    the process: a process loading several fine-tunes of one model decodes each base chunk once.
    Thread-safe (decode threads share it); entries are immutable `bytes`, so decoding a delta
    can never change one. A wrong entry could only make a delta fail its own check, never pass."""

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._entries: OrderedDict[tuple[str, ChunkKey], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        """Bytes kept at most; a cache made with None reads `BLOCKSTORE_BASE_CACHE_SIZE` here, at
        its first use (so a bad value is one error of the load that uses it, not of an import)."""
        if self._limit is None:
            self._limit = base_cache_bytes()
        return self._limit

    def resize(self, limit: int) -> None:
        """Keep at most `limit` bytes from now on (0: keep nothing), dropping the oldest entries."""
        with self._lock:
            self._limit = limit
            self._trim()

    def _trim(self) -> None:
        while self._bytes > self.limit:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped)

    def get(self, key: tuple[str, ChunkKey], raw_len: int) -> bytes | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None or len(found) != raw_len:
                return None
            self._entries.move_to_end(key)
            return found

    def put(self, key: tuple[str, ChunkKey], decoded: bytes | bytearray | memoryview) -> None:
        """Keep a copy of `decoded` (a base chunk checked against its key) if it fits."""
        if len(decoded) > self.limit:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = bytes(decoded)
            self._bytes += len(decoded)
            self._trim()


BASES = BaseCache(None)
"""The process's base cache, sized by `BLOCKSTORE_BASE_CACHE_SIZE` at first use (`resize` changes it)."""

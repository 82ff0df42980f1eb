"""The runtime's memory of materialized tensors: a budgeted LRU for static blocks, resident dynamic ones.

Static tensors (and decoded row-chunks of static tables) are kept while they fit the budget and the
coldest is evicted when a new one pushes the total over it; the next touch decodes it again. Dynamic
tensors are kept for good and never count against the budget: the compute path must not pay a
decode twice. Every lookup and decode is counted in `RuntimeStats`, so tests and benchmarks can
prove what was (and was not) read.

Evicted tensors go back to the C allocator, and glibc keeps what it freed in its heaps for reuse:
a budgeted load's anonymous memory then kept growing well past its budget. After every
`TRIM_BYTES` of evictions the cache asks glibc to return free memory to the kernel (`malloc_trim`;
a no-op elsewhere), so what a budget bounds is what the process holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass

import torch

TRIM_BYTES = 64 << 20
"""Evicted bytes between two requests to return freed memory to the kernel."""


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return trim


_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Ask the C allocator to give the memory it holds free back to the kernel (glibc only)."""
    if _TRIM is not None:
        _TRIM(0)


@dataclass
class RuntimeStats:
    """Counters since the store was opened (a copy is returned by `stats()`)."""

    chunks_read: int = 0
    bytes_read: int = 0
    bytes_decoded: int = 0
    decode_seconds: float = 0.0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetched: int = 0
    cached_bytes: int = 0
    resident_bytes: int = 0
    peak_cached_bytes: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class _Entry:
    tensor: torch.Tensor
    nbytes: int
    evictable: bool


class TensorCache:
    """Thread-safe LRU of materialized tensors with single-flight loading.

    Two threads asking for the same missing key share one decode: the first loads, the others wait
    on its future. The newest entry is never evicted by its own insertion, so a tensor bigger than
    the whole budget still works (it is evicted by the next one).
    """

    def __init__(self, budget: int | None, stats: RuntimeStats) -> None:
        self.budget = budget
        self.stats = stats
        self.lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._loading: dict[Hashable, Future[dict[Hashable, torch.Tensor]]] = {}
        self._evicted_since_trim = 0

    def __contains__(self, key: Hashable) -> bool:
        with self.lock:
            return key in self._entries or key in self._loading

    def peek(self, key: Hashable) -> torch.Tensor | None:
        """The cached tensor, counted as a hit, or None (not counted: the caller may look elsewhere)."""
        with self.lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry.tensor

    def get_or_load(
        self, key: Hashable, load: Callable[[], torch.Tensor], *, evictable: bool, prefetch: bool = False
    ) -> torch.Tensor:
        """The cached tensor for `key`, or `load()`'s result, cached (and counted) once."""
        return self.get_or_load_many([(key, evictable)], lambda _: [load()], prefetch=prefetch)[0]

    def get_or_load_many(
        self,
        requests: Sequence[tuple[Hashable, bool]],
        load_many: Callable[[list[int]], list[torch.Tensor]],
        *,
        prefetch: bool = False,
        sizes: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """The tensors for `requests` (key, evictable), in order: cached ones as they are, ones
        another thread is loading from its load, and the rest from one `load_many(positions)` call,
        which decodes them together. Each key is counted as a hit or a miss once.

        With `sizes` (bytes of each request), room is made for the evictable ones before they are
        decoded, so the cache and the tensors being decoded stay within the budget together: made
        after, a large tensor (an lm_head) sat on top of a full budget until its insertion."""
        found: dict[int, torch.Tensor] = {}
        waiting: list[tuple[int, Hashable, Future[dict[Hashable, torch.Tensor]]]] = []
        claimed: list[int] = []
        batch: Future[dict[Hashable, torch.Tensor]] = (
            Future()
        )  # one per load, not one per tensor: small tensors are many
        with self.lock:
            for position, (key, _) in enumerate(requests):
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    found[position] = entry.tensor
                elif key in self._loading:
                    waiting.append((position, key, self._loading[key]))
                else:
                    self._loading[key] = batch
                    claimed.append(position)
                    if prefetch:
                        self.stats.prefetched += 1
                    else:
                        self.stats.misses += 1
                    continue
                if not prefetch:
                    self.stats.hits += 1
            if sizes is not None and claimed:  # room for the claimed static tensors, before decoding
                self._evict(sum(sizes[p] for p in claimed if requests[p][1]))
        if claimed:
            loaded = self._load_claimed(requests, claimed, load_many, batch)
            found.update((position, loaded[requests[position][0]]) for position in claimed)
        for position, key, future in waiting:
            found[position] = future.result()[key]
        return [found[position] for position in range(len(requests))]

    def _load_claimed(
        self,
        requests: Sequence[tuple[Hashable, bool]],
        claimed: list[int],
        load_many: Callable[[list[int]], list[torch.Tensor]],
        batch: Future[dict[Hashable, torch.Tensor]],
    ) -> dict[Hashable, torch.Tensor]:
        keys = [requests[position][0] for position in claimed]
        try:
            tensors = load_many(claimed)
        except BaseException as exc:
            with self.lock:
                for key in keys:
                    del self._loading[key]
            batch.set_exception(exc)
            raise
        loaded = dict(zip(keys, tensors, strict=True))
        with self.lock:
            for key, position in zip(keys, claimed, strict=True):
                del self._loading[key]
                self._insert(key, loaded[key], requests[position][1])
            trim = self._evicted_since_trim >= TRIM_BYTES
            if trim:
                self._evicted_since_trim = 0
        batch.set_result(loaded)
        if trim:
            return_freed_memory()
        return loaded

    def _evict(self, room: int, keep: Hashable | None = None) -> None:
        """Evict the coldest evictable entries (never `keep`) until `room` more bytes fit."""
        if self.budget is None:
            return
        for old_key in [k for k, e in self._entries.items() if e.evictable and k != keep]:
            if self.stats.cached_bytes + room <= self.budget:
                break
            evicted = self._entries.pop(old_key).nbytes
            self.stats.cached_bytes -= evicted
            self.stats.evictions += 1
            self._evicted_since_trim += evicted

    def _insert(self, key: Hashable, tensor: torch.Tensor, evictable: bool) -> None:
        nbytes = tensor.untyped_storage().nbytes()
        self._entries[key] = _Entry(tensor, nbytes, evictable)
        if not evictable:
            self.stats.resident_bytes += nbytes
            return
        self.stats.cached_bytes += nbytes
        self.stats.peak_cached_bytes = max(self.stats.peak_cached_bytes, self.stats.cached_bytes)
        self._evict(0, keep=key)

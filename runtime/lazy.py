"""`LazyStateDict` and `LazyTensor`: a snapshot's tensors, decoded only when touched.

Opening reads the snapshot alone. `materialize()` decodes a tensor's chunks in parallel (one zstd
context per thread, see `blockstore.codecs.lossless`) through `Repository.decode_chunk_into`, straight
from the store's copy into one preallocated buffer — pinned when the target is a GPU, so the
host→device copy is asynchronous. Row lookups on a static table decode only the chunks that hold
those rows (chunk boundaries fall on whole rows), which is what an embedding lookup needs.

Integrity: every chunk is checked as it is decoded against the BLAKE3 digest its snapshot promises
(version 3), which a chunk built to collide with another's xxh3 key cannot meet, and the digests
come from a snapshot checked against its blake2b id, whose tensor digests bind them; so a tensor is
exactly the one packed. A snapshot of an older version gives only xxh3-128 keys to check against,
and its whole-tensor blake2b digest is left to `verify` and `export`.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import replace
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch

from blockstore.core.dtypes import nbytes_of
from blockstore.core.manifests import Snapshot, SnapshotId, TensorEntry
from blockstore.core.policy import STATIC
from blockstore.errors import InvalidArgument, UnsupportedInput
from blockstore.repo import DEFAULT_REF, Repository
from blockstore.sizes import parse_size
from blockstore.storage.base import short_id

from .cache import RuntimeStats, TensorCache
from .prefetch import LayerPrefetcher
from .readahead import Readahead
from .threads import ProcessLocalPool, run_shared

_OPTIONAL_DTYPES = {
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    **{name: getattr(torch, attr) for name, attr in _OPTIONAL_DTYPES.items() if hasattr(torch, attr)},
}
"""safetensors dtype → torch dtype. F4 and F6 have no element-per-element torch dtype."""
REMOTE_WORKERS = 16
"""Decode threads for a store whose reads are round trips (an object store): each thread fetches
the chunk it decodes, so this many requests are in flight; as many as cores left the link idle."""


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device the runtime can place tensors on, refused clearly when it is not there."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"device {device!r} is not a torch device ({exc})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device {str(resolved)!r} requested but CUDA is not available here")
    if resolved.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device {str(resolved)!r} is not supported (cpu or cuda)")
    return resolved


class LazyTensor:
    """A handle on one stored tensor: metadata now, bytes on `materialize()` or row lookup."""

    def __init__(self, owner: LazyStateDict, entry: TensorEntry) -> None:
        self._owner = owner
        self.entry = entry
        self._row_starts = _row_starts(entry)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def dtype(self) -> torch.dtype:
        return self._owner.torch_dtype(self.entry)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.entry.shape)

    @property
    def side(self) -> str:
        return self.entry.side

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, {self.entry.dtype}, {list(self.entry.shape)}, {self.side})"

    def materialize(self, device: str | torch.device | None = None) -> torch.Tensor:
        """The whole tensor at its stored dtype on `device` (default: the state dict's)."""
        return self._owner.materialize(self.entry, device)

    def index_select(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Rows `ids` of dimension 0, decoding only the chunks that hold them (for a static table
        not already materialized); the result is a new tensor on the state dict's device."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        rows = self.shape[0] if self.shape else 0
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
            raise IndexError(f"row index out of range for tensor {self.name!r} with {rows} rows")
        full = self._owner.cached(self.entry)
        if full is not None or self._row_starts is None or self.side != STATIC:
            full = full if full is not None else self.materialize()
            return full.index_select(0, ids.to(full.device))
        return self._owner.gather_rows(self.entry, self._row_starts, ids)

    def __getitem__(self, index: Any) -> torch.Tensor:
        """`t[i]`, `t[a:b]`, `t[[i, j]]` or `t[long_tensor]` read rows through `index_select`;
        any other index materializes the tensor and indexes it."""
        if not self.shape:
            return self.materialize()[index]
        rows = self.shape[0]
        if isinstance(index, int) and -rows <= index < rows:
            return self.index_select([index % rows])[0]
        if isinstance(index, slice):
            return self.index_select(torch.arange(*index.indices(rows)))
        if isinstance(index, list) or (isinstance(index, torch.Tensor) and not index.is_floating_point()):
            ids = torch.as_tensor(index)
            if ids.dtype != torch.bool and ids.dim() == 1:
                return self.index_select(torch.where(ids < 0, ids + rows, ids))
        return self.materialize()[index]


_DECODE_POOLS: dict[int, ProcessLocalPool] = {}


def decode_pool(workers: int) -> ProcessLocalPool:
    """The process's decode threads, `workers` of them, shared by every state dict opened here.

    Each thread keeps a zstd context and scratch buffers (`blockstore.codecs.lossless`,
    `blockstore.codecs.planes`); a pool per open threw them away with its threads, and rebuilding
    them was a large share of a small model's load."""
    if workers not in _DECODE_POOLS:
        _DECODE_POOLS[workers] = ProcessLocalPool(workers, f"blockstore-decode-{workers}")
    return _DECODE_POOLS[workers]


def _row_starts(entry: TensorEntry) -> list[int] | None:
    """First row of each chunk, plus the row count at the end, when every chunk boundary falls on
    a whole row (the usual cut); None when rows cannot be read chunk by chunk."""
    if len(entry.shape) < 2 or entry.shape[0] == 0 or not entry.chunks:
        return None
    row_bytes = nbytes_of(entry.dtype, math.prod(entry.shape[1:]))
    if not row_bytes:
        return None
    offsets = [0, *accumulate(chunk.raw_len for chunk in entry.chunks)]
    if any(offset % row_bytes for offset in offsets):
        return None
    return [offset // row_bytes for offset in offsets]


class LazyStateDict(Mapping[str, LazyTensor]):
    """A read-only Mapping name → LazyTensor over one snapshot of a store.

    The snapshot is fixed at open time: a writer that packs or applies a new version meanwhile does
    not change what this object reads, and the snapshot is pinned (`lease`) so `gc` keeps its chunks
    until `close()`. In a forked child, tensors already materialized stay usable and anything that
    needs the store raises a clear error (LMDB handles cannot cross fork(); decode threads are
    restarted so that error surfaces instead of a hang).
    """

    def __init__(
        self,
        repo: Repository,
        snapshot_id: SnapshotId,
        snapshot: Snapshot,
        *,
        device: str | torch.device = "cpu",
        budget: int | str | None = None,
        prefetch: int = 0,
        workers: int | None = None,
        lease: bytes | None = None,
    ) -> None:
        if prefetch < 0:
            raise InvalidArgument(f"prefetch {prefetch} is negative")
        self.repo = repo
        self.snapshot_id = snapshot_id
        self.snapshot = snapshot
        self.device = resolve_device(device)
        self._stats = RuntimeStats()
        self._cache = TensorCache(parse_size(budget), self._stats)
        self.remote = repo.store.capabilities.concurrency > 1
        self._pool = decode_pool(workers or (REMOTE_WORKERS if self.remote else min(8, os.cpu_count() or 1)))
        self._lease = lease
        self._tensors = {name: LazyTensor(self, entry) for name, entry in snapshot.tensors.items()}
        self._prefetcher = LayerPrefetcher(self, prefetch) if prefetch else None
        self._readahead: Readahead | None = None
        # Registered last, once nothing here can fail (`open` releases on failure). The pin must not
        # outlive this object: close() releases it, and a reader never closed releases it when it
        # is collected or the interpreter exits; a stale lease would keep its snapshot from gc until
        # a sweep of dead processes' leases. The callback holds the store, never `self`.
        self._release = weakref.finalize(self, _release_unclosed, repo, lease, os.getpid())
        _watch_for_exit()

    # Mapping -----------------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> LazyTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in snapshot {short_id(self.snapshot_id)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    # lifecycle ---------------------------------------------------------------------------------------

    @property
    def config(self) -> bytes | None:
        """config.json as packed beside the weights, if it was."""
        return self.snapshot.extras.get("config.json")

    def stats(self) -> RuntimeStats:
        """A copy of the counters: chunks read, bytes decoded, hits, misses, evictions, ..."""
        with self._cache.lock:
            return replace(self._stats)

    def wait_for_prefetch(self) -> None:
        """Block until the background decodes scheduled so far are done (for measurements)."""
        if self._prefetcher:
            self._prefetcher.wait()
        if self._readahead:
            self._readahead.wait()

    def read_ahead(self, names: Iterable[str]) -> None:
        """Start reading tensors `names` in that order in the background (see `Readahead`): the
        order a model's forward will use them. Once per state dict; a later call is ignored."""
        if self._readahead is None:
            self._readahead = Readahead(self, [self[name].entry for name in names])

    @property
    def closed(self) -> bool:
        """Whether `close()` ran (or the pin was released otherwise): the store is no longer read."""
        return not self._release.alive

    def close(self) -> None:
        """Stop prefetching, unpin the snapshot and close the store; tensors already returned stay
        valid, and closing twice is harmless. In a forked child the pin stays: it is the parent's.
        The decode threads are the process's (`decode_pool`) and stay for the next open."""
        if self._prefetcher:
            self._prefetcher.close()
        if self._readahead:
            self._readahead.close()
        pending = self._release.detach()  # None once released: close() twice, or after exit began
        self._lease = None
        if pending is not None:
            _release(*pending[2])

    def __enter__(self) -> LazyStateDict:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # materialization -----------------------------------------------------------------------------------

    def torch_dtype(self, entry: TensorEntry) -> torch.dtype:
        dtype = TORCH_DTYPES.get(entry.dtype)
        if dtype is None:
            raise UnsupportedInput(entry.name, f"dtype {entry.dtype} has no torch equivalent here")
        return dtype

    def is_materialized(self, name: str) -> bool:
        """Whether tensor `name` is materialized (or being) on the default device, without a count."""
        return (name, str(self.device)) in self._cache

    def cached(self, entry: TensorEntry) -> torch.Tensor | None:
        """The whole tensor if it is materialized on the default device right now (a hit), else None."""
        return self._cache.peek((entry.name, str(self.device)))

    def materialize(
        self, entry: TensorEntry, device: str | torch.device | None = None, *, prefetch: bool = False
    ) -> torch.Tensor:
        """The whole tensor `entry` on `device` (default: the state dict's), decoded once and cached."""
        return self.materialize_many([entry], device, prefetch=prefetch)[0]

    def materialize_many(
        self, entries: list[TensorEntry], device: str | torch.device | None = None, *, prefetch: bool = False
    ) -> list[torch.Tensor]:
        """`entries` materialized, in order. The chunks of every tensor not yet cached are decoded as
        one batch, largest first, on the decode threads: tensors held in one chunk (most of a
        transformer's) decode side by side instead of one after another."""
        target = resolve_device(device) if device is not None else self.device
        dtypes = [self.torch_dtype(entry) for entry in entries]
        if self._prefetcher and not prefetch:
            for entry in entries:
                self._prefetcher.touched(entry.name)

        def load(positions: list[int]) -> list[torch.Tensor]:
            hosts = self._decode([entries[p] for p in positions], pinned=target.type == "cuda")
            shaped = zip(positions, hosts, strict=True)
            tensors = [host.view(dtypes[p]).reshape(entries[p].shape) for p, host in shaped]
            if target.type == "cuda":
                return [tensor.to(target, non_blocking=True) for tensor in tensors]
            return tensors

        requests = [((entry.name, str(target)), entry.side == STATIC) for entry in entries]
        sizes = [entry.nbytes for entry in entries]
        return self._cache.get_or_load_many(requests, load, prefetch=prefetch, sizes=sizes)

    def load_all(
        self, names: Iterable[str] | None = None, device: str | torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """`names` (default: every tensor) materialized, as a plain dict in that order."""
        entries = [self[name].entry for name in (self if names is None else names)]
        tensors = self.materialize_many(entries, device)
        return {entry.name: tensor for entry, tensor in zip(entries, tensors, strict=True)}

    def gather_rows(self, entry: TensorEntry, row_starts: list[int], ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (checked, on the CPU) of a static table, decoding (and caching) only the chunks
        that hold them."""
        row_bytes = entry.nbytes // row_starts[-1]
        out = torch.empty((ids.numel(), row_bytes), dtype=torch.uint8)
        starts = torch.tensor(row_starts)
        chunk_of = torch.searchsorted(starts, ids, right=True) - 1
        for index in chunk_of.unique().tolist():

            def load(index: int = index) -> torch.Tensor:
                return self._decode_chunks([(entry, range(index, index + 1))], pinned=False)[0]

            block = self._cache.get_or_load((entry.name, "chunk", index), load, evictable=True)
            picked = chunk_of == index
            out[picked] = block.view(-1, row_bytes)[ids[picked] - starts[index]]
        dtype = self.torch_dtype(entry)
        result = out.view(dtype).reshape(ids.numel(), *entry.shape[1:])
        return result.to(self.device, non_blocking=True) if self.device.type == "cuda" else result

    def _decode(self, entries: list[TensorEntry], *, pinned: bool) -> list[torch.Tensor]:
        """Every chunk of `entries`, each tensor into one new uint8 buffer."""
        return self._decode_chunks([(entry, range(len(entry.chunks))) for entry in entries], pinned=pinned)

    def _decode_chunks(self, wanted: list[tuple[TensorEntry, range]], *, pinned: bool) -> list[torch.Tensor]:
        """For each (entry, consecutive chunk indices), those chunks decoded into one new uint8
        buffer; all the chunks of the batch share the decode threads, the largest taken first.

        A buffer filled by one chunk (most tensors) is allocated by the thread that decodes it, so
        allocation overlaps decoding instead of running ahead of it on the caller's thread."""
        buffers: list[torch.Tensor | None] = []
        jobs: list[tuple[int, TensorEntry, int, int, int]] = []  # slot, entry, chunk index, offset, length
        for slot, (entry, indices) in enumerate(wanted):
            offsets = [0, *accumulate(entry.chunks[i].raw_len for i in indices)]
            shared = len(indices) > 1  # by several chunks; an empty tensor's stays None, no job fills it
            buffers.append(torch.empty(offsets[-1], dtype=torch.uint8, pin_memory=pinned) if shared else None)
            jobs += [(slot, entry, i, offsets[n], entry.chunks[i].raw_len) for n, i in enumerate(indices)]
        jobs.sort(key=lambda job: job[4], reverse=True)
        stored: list[int] = []

        def decode_one(job: tuple[int, TensorEntry, int, int, int]) -> None:
            slot, entry, index, start, length = job
            buffer = buffers[slot]
            if buffer is None:  # this chunk is the whole buffer: no other job touches the slot
                buffer = buffers[slot] = torch.empty(length, dtype=torch.uint8, pin_memory=pinned)
            target = buffer.numpy().data[start : start + length]
            stored.append(self.repo.decode_chunk_into(self.snapshot_id, entry, index, target))

        started = time.perf_counter()
        run_shared(self._pool, jobs, decode_one)
        decoded = [
            buffer if buffer is not None else torch.empty(0, dtype=torch.uint8, pin_memory=pinned)
            for buffer in buffers
        ]
        with self._cache.lock:
            self._stats.chunks_read += len(jobs)
            self._stats.bytes_read += sum(stored)
            self._stats.bytes_decoded += sum(buffer.numel() for buffer in decoded)
            self._stats.decode_seconds += time.perf_counter() - started
        return decoded


def _release(repo: Repository, lease: bytes | None, owner_pid: int) -> None:
    """Unpin a reader's snapshot and close its store, in the process that pinned it only: a forked
    child inherits the parent's objects, and its exit must not drop the parent's pin."""
    if os.getpid() != owner_pid:
        return
    try:
        repo.unpin(lease)
    finally:
        repo.close()


def _release_quietly(repo: Repository, lease: bytes | None, owner_pid: int) -> None:
    """`_release` for a reader nobody closed: nothing is left to report to, and a lease that cannot
    be removed now is a dead process's once this one exits, which the next gc sweeps."""
    with suppress(Exception):
        _release(repo, lease, owner_pid)


_exiting = False
_watching_for_exit = False


def _note_exit() -> None:
    global _exiting
    _exiting = True


def _watch_for_exit() -> None:
    """Note when the interpreter starts exiting, before weakref runs its finalizers at exit: this
    registers after weakref's own exit hook (which the first `weakref.finalize` registered), and
    exit hooks run last-registered first."""
    global _watching_for_exit
    if not _watching_for_exit:
        atexit.register(_note_exit)
        _watching_for_exit = True


def _release_unclosed(repo: Repository, lease: bytes | None, owner_pid: int) -> None:
    """A reader nobody closed is released here: at exit, right away; when it is garbage collected,
    on a thread of its own, because collection can run inside one of this thread's store write
    transactions (anything that allocates can trigger it), where another write would wait for itself.
    The thread is not a daemon, so the interpreter finishes it before it exits."""
    if os.getpid() != owner_pid:
        return
    if not _exiting:
        args = (repo, lease, owner_pid)
        thread = threading.Thread(target=_release_quietly, args=args, name="blockstore-unpin")
        with suppress(RuntimeError):  # no new threads once the interpreter is shutting down
            thread.start()
            return
    _release_quietly(repo, lease, owner_pid)


def open(
    store: str | Path,
    ref: str = DEFAULT_REF,
    *,
    device: str | torch.device = "cpu",
    budget: int | str | None = None,
    prefetch: int = 0,
    workers: int | None = None,
    cache: str | Path | None = None,
) -> LazyStateDict:
    """Open `ref` (a ref name or snapshot id prefix) of the store at `store` for lazy reading.

    Only the snapshot is read here. `budget` ('2GB', '512MiB' or bytes) bounds the static tensors
    kept materialized; `prefetch=N` decodes the next N layers' static tensors in the background when
    a layer is touched; `device` places materialized tensors (cpu or cuda). `store` may be an
    object store URL (`s3://bucket/prefix`); `cache` then names a local read-through cache directory.
    """
    repo = Repository.open_for_reading(store, cache=cache)
    lease = None
    try:
        snapshot_id, lease = repo.pin(ref)
        snapshot = repo.snapshot(snapshot_id)
        return LazyStateDict(
            repo,
            snapshot_id,
            snapshot,
            device=device,
            budget=budget,
            prefetch=prefetch,
            workers=workers,
            lease=lease,
        )
    except BaseException:
        repo.unpin(lease)
        repo.close()
        raise

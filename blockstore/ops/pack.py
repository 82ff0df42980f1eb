"""`pack`: turn safetensors files into a snapshot of deduplicated, compressed chunks.

All input headers are validated before anything is written. Chunks are hashed as they are read and
encoded on a thread pool (zstd releases the GIL), committed in bounded batches, and only then is the
snapshot written and the ref moved, so an interrupted pack leaves the store as it was plus, at worst,
some unreferenced chunks.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockstore.codecs.lossless import ByteGroupZstd, Codec, Raw, Zstd
from blockstore.codecs.lossy import lossy_codec
from blockstore.core.chunks import check_chunk_size, chunk_ranges, chunk_value, encode_chunk
from blockstore.core.dtypes import plane_count
from blockstore.core.hashing import ChunkKey, chunk_key, new_digest
from blockstore.core.manifests import ChunkRef, Snapshot, SnapshotId, SourceFile, TensorEntry, TensorError
from blockstore.core.policy import LOSSLESS, Decision, Policy
from blockstore.core.source import ModelSource, SafetensorsFile, TensorInfo, discover, read_range
from blockstore.errors import InvalidArgument
from blockstore.progress import Progress, Silent
from blockstore.repo import Repository, check_ref_name

CODEC_CHOICES = ("bytegroup+zstd", "zstd", "raw")
DEFAULT_CODEC = "bytegroup+zstd"
# Float dtypes whose sign bit is moved out of the exponent byte before byte grouping.
SIGN_SPLIT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_BATCH_BYTES = 64 << 20

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PackResult:
    """What a pack did: the snapshot it published (or found unchanged) and what it cost."""

    snapshot_id: SnapshotId
    ref: str | None
    tensors: int
    raw_bytes: int
    stored_bytes: int
    new_chunks: int
    new_bytes: int
    total_chunks: int
    seconds: float
    unchanged: bool
    decisions: dict[str, Decision] = field(default_factory=dict)
    groups: dict[str, GroupStats] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0

    def to_json(self, *, explain: bool = False) -> dict[str, object]:
        """What `pack --json` prints; `explain` adds each tensor's side, tier and reason."""
        payload: dict[str, object] = {
            "snapshot": self.snapshot_id.hex(),
            "ref": self.ref,
            "unchanged": self.unchanged,
            "tensors": self.tensors,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "ratio": round(self.ratio, 4),
            "chunks": self.total_chunks,
            "new_chunks": self.new_chunks,
            "new_bytes": self.new_bytes,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.raw_bytes / 1e6 / self.seconds, 1) if self.seconds else None,
            "groups": {key: group.to_json() for key, group in self.groups.items()},
        }
        if explain:
            payload["explain"] = {
                name: {"side": decision.side, "tier": decision.tier, "reason": decision.reason}
                for name, decision in self.decisions.items()
            }
        return payload


@dataclass(frozen=True)
class GroupStats:
    """Totals of the tensors sharing one side and tier ("static/int8"), and their worst error."""

    tensors: int
    raw_bytes: int
    stored_bytes: int
    worst_rel_error: float | None

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0

    def to_json(self) -> dict[str, object]:
        return {
            "tensors": self.tensors,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "worst_rel_error": self.worst_rel_error,
            "ratio": round(self.ratio, 4),
        }


def group_stats(entries: Iterable[TensorEntry]) -> dict[str, GroupStats]:
    """Per side/tier totals of a snapshot's tensors (what `pack` prints)."""
    grouped: dict[str, list[TensorEntry]] = {}
    for entry in entries:
        grouped.setdefault(f"{entry.side}/{entry.tier}", []).append(entry)
    return {
        key: GroupStats(
            len(members),
            sum(e.nbytes for e in members),
            sum(e.stored_bytes for e in members),
            max((e.error.rel_frobenius for e in members if e.error), default=None),
        )
        for key, members in sorted(grouped.items())
    }


def codec_for(codec_id: str, dtype: str, level: int) -> Codec:
    """The codec a tensor of `dtype` gets under the user's `--codec` choice."""
    if codec_id == "bytegroup+zstd":
        itemsize = plane_count(dtype)
        return ByteGroupZstd(itemsize, level, split_sign=dtype in SIGN_SPLIT_DTYPES)
    if codec_id == "zstd":
        return Zstd(level=level)
    if codec_id == "raw":
        return Raw()
    raise InvalidArgument(f"unknown codec {codec_id!r}; choose one of {', '.join(CODEC_CHOICES)}")


class _ChunkWriter:
    """Dedups chunks against the store and this pack, encodes new ones in parallel, commits batches."""

    def __init__(self, repo: Repository, workers: int) -> None:
        self._store = repo.store
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blockstore-encode")
        self.sizes: dict[ChunkKey, int] = {}
        self._pending: dict[ChunkKey, Future[bytes]] = {}
        self._pending_raw = 0
        self.new_chunks = 0
        self.new_bytes = 0

    def _is_new(self, key: ChunkKey) -> bool:
        if key in self.sizes or key in self._pending:
            return False
        existing = self._store.stored_sizes([key])
        self.sizes.update(existing)
        return not existing

    def _queue(self, key: ChunkKey, value: Future[bytes], raw_len: int) -> None:
        self._pending[key] = value
        self._pending_raw += raw_len
        if self._pending_raw >= _BATCH_BYTES:
            self.flush()

    def add(self, key: ChunkKey, codec: Codec, raw: bytes) -> None:
        """Queue a lossless chunk: encoded on the pool unless the store or this pack has it."""
        if self._is_new(key):
            self._queue(key, self._pool.submit(encode_chunk, codec, memoryview(raw)), len(raw))

    def add_value(self, key: ChunkKey, value: bytes, raw_len: int) -> None:
        """Queue a chunk whose stored value is already made (a lossy tier keys by decoded bytes)."""
        if self._is_new(key):
            done: Future[bytes] = Future()
            done.set_result(value)
            self._queue(key, done, raw_len)

    def flush(self) -> None:
        encoded = [(key, future.result()) for key, future in self._pending.items()]
        self.new_bytes += self._store.put_batch(encoded)
        self.new_chunks += len(encoded)
        self.sizes.update((key, len(value)) for key, value in encoded)
        self._pending.clear()
        self._pending_raw = 0

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _pack_tensor(
    handle: int,
    source: SafetensorsFile,
    tensor: TensorInfo,
    chunk_size: int,
    store_chunk: Callable[[bytes], tuple[ChunkKey, bytes]],
    progress: Progress,
) -> tuple[list[tuple[ChunkKey, int]], bytes]:
    """Read one tensor chunk by chunk and hand each to `store_chunk`, which queues it and returns
    its key and the bytes it decodes to (the raw bytes when lossless); those are digested."""
    hasher = new_digest()
    chunks = []
    for start, end in chunk_ranges(tensor.dtype, tensor.shape, tensor.nbytes, chunk_size):
        raw = read_range(handle, source.data_start + tensor.begin + start, end - start, source.path)
        key, decoded = store_chunk(raw)
        hasher.update(decoded)
        chunks.append((key, len(raw)))
        progress.advance(len(raw), tensor.name)
    return chunks, hasher.digest()


def _lossless_store(codec: Codec, writer: _ChunkWriter) -> Callable[[bytes], tuple[ChunkKey, bytes]]:
    def store(raw: bytes) -> tuple[ChunkKey, bytes]:
        key = chunk_key(raw)
        writer.add(key, codec, raw)
        return key, raw

    return store


class _ErrorMeter:
    """Accumulates a lossy tensor's error over its chunks (float64 sums: no overflow on big ones)."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.error_sq = 0.0
        self.original_sq = 0.0

    def add(self, original: torch.Tensor, decoded: torch.Tensor) -> None:
        difference = decoded.double() - original.double()
        self.max_abs = max(self.max_abs, float(difference.abs().max()) if difference.numel() else 0.0)
        self.error_sq += float(difference.square().sum())
        self.original_sq += float(original.double().square().sum())

    def result(self) -> TensorError:
        if self.original_sq == 0:
            return TensorError(self.max_abs, 0.0 if self.error_sq == 0 else math.inf)
        return TensorError(self.max_abs, math.sqrt(self.error_sq / self.original_sq))


def _lossy_store(
    codec: Any, writer: _ChunkWriter, meter: _ErrorMeter, where: str
) -> Callable[[bytes], tuple[ChunkKey, bytes]]:
    """Quantize a chunk; it is keyed by its decoded bytes, and its error goes to `meter`."""
    import torch

    def store(raw: bytes) -> tuple[ChunkKey, bytes]:
        try:
            payload, decoded = codec.quantize(memoryview(raw))
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc}") from None
        decoded_bytes = decoded.view(torch.uint8).numpy().tobytes()
        meter.add(torch.frombuffer(bytearray(raw), dtype=decoded.dtype).float(), decoded.float())
        key = chunk_key(decoded_bytes)
        writer.add_value(key, chunk_value(codec, payload), len(raw))
        return key, decoded_bytes

    return store


def plan(model: ModelSource, policy: Policy) -> dict[str, Decision]:
    """Every tensor's side, tier and reason, decided before anything is read or written."""
    return {
        tensor.name: policy.decide(tensor.name, tensor.dtype, tensor.shape)
        for source in model.files
        for tensor in source.tensors
    }


def pack(
    repo: Repository,
    inputs: list[Path],
    *,
    ref: str | None = "main",
    message: str = "",
    codec: str = DEFAULT_CODEC,
    level: int = 3,
    chunk_size: int | None = None,
    workers: int | None = None,
    policy: Policy | None = None,
    progress: Progress | None = None,
) -> PackResult:
    """Pack safetensors files (or a model directory) into `repo` and point `ref` at the result.

    With `ref=None` the snapshot is stored but no ref moves (`diff` packs a file on the fly so).
    `chunk_size` defaults to the store's own, so versions of a model dedup against each other.
    `policy` decides each tensor's side and tier (default: the built-in rules, everything lossless);
    `codec` is the lossless codec.
    """
    started = time.perf_counter()
    if ref is not None:
        check_ref_name(ref)
    options = _Options(codec, level, chunk_size or repo.chunk_size, workers, policy or Policy())
    check_chunk_size(options.chunk_size)
    codec_for(codec, "F32", level)  # refuse a bad codec or level before reading anything
    model = discover(inputs)
    decisions = plan(model, options.policy)
    lossy_codecs = {
        name: lossy_codec(decision.tier, _dtype_of(model, name), options.policy.block_size, level)
        for name, decision in decisions.items()
        if decision.tier != LOSSLESS
    }
    with repo.writer_lease():
        result = _pack_model(
            repo, model, ref, message, options, decisions, lossy_codecs, progress or Silent()
        )
    return replace(result, seconds=time.perf_counter() - started)


@dataclass(frozen=True)
class _Options:
    codec: str
    level: int
    chunk_size: int
    workers: int | None
    policy: Policy


def _dtype_of(model: ModelSource, name: str) -> str:
    return next(t.dtype for source in model.files for t in source.tensors if t.name == name)


def _pack_model(
    repo: Repository,
    model: ModelSource,
    ref: str | None,
    message: str,
    options: _Options,
    decisions: dict[str, Decision],
    lossy_codecs: dict[str, Any],
    progress: Progress,
) -> PackResult:
    expected = repo.store.get_ref(ref) if ref is not None else None
    progress.start("pack", sum(source.nbytes for source in model.files))
    writer = _ChunkWriter(repo, options.workers or os.cpu_count() or 1)
    packed: dict[str, tuple[TensorInfo, str, list[tuple[ChunkKey, int]], bytes, TensorError | None]] = {}
    try:
        for source in model.files:
            handle = os.open(source.path, os.O_RDONLY)
            try:
                for tensor in source.tensors:
                    lossy = lossy_codecs.get(tensor.name)
                    meter = _ErrorMeter()
                    if lossy is not None:
                        where = f"{source.path}: tensor {tensor.name!r}"
                        codec_id, store = lossy.id, _lossy_store(lossy, writer, meter, where)
                    else:
                        lossless = codec_for(options.codec, tensor.dtype, options.level)
                        codec_id, store = lossless.id, _lossless_store(lossless, writer)
                    chunks, tensor_digest = _pack_tensor(
                        handle, source, tensor, options.chunk_size, store, progress
                    )
                    error = meter.result() if lossy is not None else None
                    packed[tensor.name] = (tensor, codec_id, chunks, tensor_digest, error)
            finally:
                os.close(handle)
        writer.flush()
    finally:
        writer.close()
    entries = {
        name: TensorEntry(
            name=name,
            dtype=tensor.dtype,
            shape=tensor.shape,
            side=decisions[name].side,
            tier=decisions[name].tier,
            codec=codec_id,
            chunks=tuple(ChunkRef(key, raw_len, writer.sizes[key]) for key, raw_len in chunks),
            digest=tensor_digest,
            error=error,
        )
        for name, (tensor, codec_id, chunks, tensor_digest, error) in packed.items()
    }
    files = tuple(
        SourceFile(source.path.name, source.header, tuple(t.name for t in source.tensors))
        for source in model.files
    )
    snapshot = Snapshot(files, entries, model.extras, expected, message, time.time_ns())
    unchanged = expected is not None and _same_content(repo.snapshot(expected), snapshot)
    if unchanged:
        snapshot_id = expected
    elif ref is None:
        snapshot_id = repo.store_snapshot(snapshot)
    else:
        snapshot_id = repo.publish(snapshot, ref, expected, op="pack")
    return PackResult(
        snapshot_id=snapshot_id,
        ref=ref,
        tensors=len(entries),
        raw_bytes=snapshot.nbytes,
        stored_bytes=snapshot.stored_bytes,
        new_chunks=writer.new_chunks,
        new_bytes=writer.new_bytes,
        total_chunks=sum(len(entry.chunks) for entry in entries.values()),
        seconds=0.0,
        unchanged=unchanged,
        decisions=decisions,
        groups=group_stats(entries.values()),
    )


def _same_content(old: Snapshot, new: Snapshot) -> bool:
    """True when publishing `new` would add nothing but a timestamp to `old`."""
    return (old.files, dict(old.tensors), dict(old.extras)) == (
        new.files,
        dict(new.tensors),
        dict(new.extras),
    )

"""`pack`: turn safetensors files into a snapshot of deduplicated, compressed chunks.

All input headers are validated before anything is written. Chunks are hashed as they are read and
encoded on a thread pool (zstd releases the GIL), committed in bounded batches, and only then is the
snapshot written and the ref moved, so an interrupted pack leaves the store as it was plus, at worst,
some unreferenced chunks.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .chunks import check_chunk_size, chunk_ranges, encode_chunk
from .codecs import ByteGroupZstd, Codec, Raw, Zstd
from .dtypes import plane_count
from .errors import InvalidArgument
from .hashing import ChunkKey, chunk_key, new_digest
from .manifests import ChunkRef, Snapshot, SnapshotId, SourceFile, TensorEntry
from .policy import default_side
from .progress import Progress, Silent
from .repo import Repository, check_ref_name
from .source import ModelSource, SafetensorsFile, TensorInfo, discover, read_range

CODEC_CHOICES = ("bytegroup+zstd", "zstd", "raw")
DEFAULT_CODEC = "bytegroup+zstd"
LOSSLESS = "lossless"
_BATCH_BYTES = 64 << 20


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

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0


def codec_for(codec_id: str, dtype: str, level: int) -> Codec:
    """The codec a tensor of `dtype` gets under the user's `--codec` choice."""
    if codec_id == "bytegroup+zstd":
        return ByteGroupZstd(itemsize=plane_count(dtype), level=level)
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

    def add(self, key: ChunkKey, codec: Codec, raw: bytes) -> None:
        if key in self.sizes or key in self._pending:
            return
        existing = self._store.stored_sizes([key])
        if existing:
            self.sizes.update(existing)
            return
        self._pending[key] = self._pool.submit(encode_chunk, codec, memoryview(raw))
        self._pending_raw += len(raw)
        if self._pending_raw >= _BATCH_BYTES:
            self.flush()

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
    codec: Codec,
    chunk_size: int,
    writer: _ChunkWriter,
    progress: Progress,
) -> tuple[list[tuple[ChunkKey, int]], bytes]:
    """Read, hash and queue one tensor's chunks; returns its (key, raw length) list and digest."""
    hasher = new_digest()
    chunks = []
    for start, end in chunk_ranges(tensor.dtype, tensor.shape, tensor.nbytes, chunk_size):
        raw = read_range(handle, source.data_start + tensor.begin + start, end - start, source.path)
        hasher.update(raw)
        key = chunk_key(raw)
        chunks.append((key, len(raw)))
        writer.add(key, codec, raw)
        progress.advance(len(raw))
    return chunks, hasher.digest()


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
    progress: Progress | None = None,
) -> PackResult:
    """Pack safetensors files (or a model directory) into `repo` and point `ref` at the result.

    With `ref=None` the snapshot is stored but no ref moves (`diff` packs a file on the fly so).
    `chunk_size` defaults to the store's own, so versions of a model dedup against each other.
    """
    started = time.perf_counter()
    if ref is not None:
        check_ref_name(ref)
    chunk_size = chunk_size or repo.chunk_size
    check_chunk_size(chunk_size)
    codec_for(codec, "F32", level)  # refuse a bad codec or level before reading anything
    progress = progress or Silent()
    model = discover(inputs)
    with repo.writer_lease():
        return _pack_model(repo, model, ref, message, codec, level, chunk_size, workers, progress, started)


def _pack_model(
    repo: Repository,
    model: ModelSource,
    ref: str | None,
    message: str,
    codec: str,
    level: int,
    chunk_size: int,
    workers: int | None,
    progress: Progress,
    started: float,
) -> PackResult:
    expected = repo.store.get_ref(ref) if ref is not None else None
    progress.start("pack", sum(source.nbytes for source in model.files))
    writer = _ChunkWriter(repo, workers or os.cpu_count() or 1)
    pending: list[tuple[TensorInfo, Codec, list[tuple[ChunkKey, int]], bytes]] = []
    try:
        for source in model.files:
            handle = os.open(source.path, os.O_RDONLY)
            try:
                for tensor in source.tensors:
                    tensor_codec = codec_for(codec, tensor.dtype, level)
                    chunks, tensor_digest = _pack_tensor(
                        handle, source, tensor, tensor_codec, chunk_size, writer, progress
                    )
                    pending.append((tensor, tensor_codec, chunks, tensor_digest))
            finally:
                os.close(handle)
        writer.flush()
    finally:
        writer.close()
    entries = {
        tensor.name: TensorEntry(
            name=tensor.name,
            dtype=tensor.dtype,
            shape=tensor.shape,
            side=default_side(tensor.name, tensor.dtype, tensor.shape)[0],
            tier=LOSSLESS,
            codec=tensor_codec.id,
            chunks=tuple(ChunkRef(key, raw_len, writer.sizes[key]) for key, raw_len in chunks),
            digest=tensor_digest,
        )
        for tensor, tensor_codec, chunks, tensor_digest in pending
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
        seconds=time.perf_counter() - started,
        unchanged=unchanged,
    )


def _same_content(old: Snapshot, new: Snapshot) -> bool:
    """True when publishing `new` would add nothing but a timestamp to `old`."""
    return (old.files, dict(old.tensors), dict(old.extras)) == (
        new.files,
        dict(new.tensors),
        dict(new.extras),
    )

"""`pack`: turn safetensors files into a snapshot of deduplicated, compressed chunks.

All input headers are validated and every tensor's codec chosen before anything is written. Every
tier takes one chunk path: cut (`chunk_ranges`), encode and key (`prepare_chunk`: a lossless chunk
is keyed by its raw bytes and encoded only if new, a lossy one is keyed by the bytes it decodes to),
dedup against the store and this pack, store. A lossy tensor's error is measured beside that path
(`ErrorMeter`), from the same decoded bytes. New chunks are encoded on a thread pool (zstd releases
the GIL) and committed in bounded batches, and only then is the snapshot written and the ref moved,
so an interrupted pack leaves the store as it was plus, at worst, some unreferenced chunks.

What a caller asked for but could not get is said in `PackResult.notes`: a chunk already stored
keeps the codec it was stored with, and chunks cut at another size than the store's never dedup.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from blockstore.codecs import ByteGroupZstd, Codec, ErrorMeter, Raw, Zstd, is_lossy, lossy_codec
from blockstore.core.chunks import (
    PreparedChunk,
    check_chunk_size,
    chunk_ranges,
    is_delta_value,
    prepare_chunk,
    raw_value_len,
)
from blockstore.core.dtypes import plane_count
from blockstore.core.hashing import ChunkKey, strong_digest
from blockstore.core.manifests import (
    ChunkRef,
    Snapshot,
    SnapshotId,
    SourceFile,
    TensorEntry,
    TensorError,
    merkle_digest,
)
from blockstore.core.policy import LOSSLESS, Decision, Policy
from blockstore.core.source import (
    ModelSource,
    SafetensorsFile,
    TensorInfo,
    check_unchanged,
    discover,
    open_regular,
    read_range,
)
from blockstore.errors import BlockstoreError, ChunkCollision, InvalidArgument
from blockstore.ops.deltas import DeltaEncoder
from blockstore.progress import Progress, Silent
from blockstore.repo import BATCH_BYTES, Repository, check_ref_name

CODEC_CHOICES = ("bytegroup+zstd", "zstd", "raw")
DEFAULT_CODEC = "bytegroup+zstd"
# Float dtypes whose sign bit is moved out of the exponent byte before byte grouping.
SIGN_SPLIT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
AUTO_BASE = "auto"
"""`pack(base=AUTO_BASE)`: store new chunks as deltas against a snapshot already in the store that
holds the same tensors (names, dtypes, shapes): the ref's own first, then the other refs'."""


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
    delta_base: SnapshotId | None = None
    """The snapshot new chunks were stored as deltas against (None: no base was used)."""
    delta_chunks: int = 0
    """New chunks stored as deltas (each where it was smaller than the chunk stored on its own)."""
    decisions: dict[str, Decision] = field(default_factory=dict)
    groups: dict[str, GroupStats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """What the caller asked for that could not take effect, one sentence each."""

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0

    def to_json(self, *, explain: bool = False) -> dict[str, object]:
        """The result as `pack --json` prints it; `explain` adds each tensor's decision."""
        summary: dict[str, object] = {
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
            "delta_base": self.delta_base.hex() if self.delta_base else None,
            "delta_chunks": self.delta_chunks,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.raw_bytes / 1e6 / self.seconds, 1) if self.seconds else None,
            "groups": {
                key: {**asdict(group), "ratio": round(group.ratio, 4)} for key, group in self.groups.items()
            },
        }
        if explain:
            summary["explain"] = {name: asdict(decision) for name, decision in self.decisions.items()}
        summary["notes"] = list(self.notes)
        return summary


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
    """Dedups chunks against the store and this pack, encodes new ones in parallel, commits batches.

    A full batch is committed by a writer thread while the next one is read and encoded: written
    from the reading thread, each commit (and its fdatasync) left the encoders idle. At most one
    batch is being written while another fills, so memory stays at about two batches.

    A key (xxh3) can be shared by two different chunks built to collide, so a chunk is deduplicated
    only after its strong digest matched the one already there: this pack's earlier chunk, or the
    stored chunk's as the store knows it (`StoredDigests`: vouched for by the snapshots the refs
    hold, else decoded once). A mismatch refuses the pack before anything is published."""

    def __init__(self, repo: Repository, workers: int) -> None:
        self._repo = repo
        self._digests = repo.stored_digests()
        self.strong: dict[ChunkKey, bytes] = {}
        """The strong digest of every chunk this pack references, by key."""
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blockstore-encode")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockstore-pack-writer")
        self._writing: Future[tuple[int, list[tuple[ChunkKey, int]], int]] | None = None
        self.sizes: dict[ChunkKey, int] = {}
        self._pending: dict[ChunkKey, Future[bytes]] = {}
        self._pending_raw = 0
        self.new_chunks = 0
        self.new_bytes = 0
        self.delta_chunks = 0
        self.reused: dict[ChunkKey, str] = {}
        """Chunks the store already held, each with the lossless codec this pack would have used."""

    def add(self, chunk: PreparedChunk, codec: Codec, strong: bytes, tensor: str) -> None:
        """Queue a chunk unless the store or this pack has it; its stored value is made on the pool.
        Raises ChunkCollision when what is there under its key is other bytes."""
        known = self.strong.get(chunk.key)
        if known is not None:
            if known != strong:
                raise ChunkCollision(
                    tensor, chunk.key.hex(), "this pack", known.hex()[:16], strong.hex()[:16]
                )
            return
        existing = self._repo.stored_sizes([chunk.key])
        if existing:
            stored = self._digests.of(chunk.key, chunk.raw_len)
            if stored != strong:
                raise ChunkCollision(
                    tensor, chunk.key.hex(), "the store", stored.hex()[:16], strong.hex()[:16]
                )
            self.strong[chunk.key] = strong
            self.sizes.update(existing)
            if not is_lossy(codec):
                self.reused[chunk.key] = codec.id
            return
        self.strong[chunk.key] = strong
        self._pending[chunk.key] = self._pool.submit(chunk.stored_value)
        self._pending_raw += chunk.raw_len
        if self._pending_raw >= BATCH_BYTES:
            self.flush()

    def flush(self, *, wait: bool = False) -> None:
        """Hand the pending chunks to the writer (after the batch before them is written); with
        `wait`, return once everything is committed. A failed write raises here."""
        self._collect()
        if self._pending:
            pending = list(self._pending.items())
            self._writing = self._writer.submit(self._write, pending)
            self._pending = {}
            self._pending_raw = 0
        if wait:
            self._collect()

    def _write(
        self, pending: list[tuple[ChunkKey, Future[bytes]]]
    ) -> tuple[int, list[tuple[ChunkKey, int]], int]:
        """(bytes newly written, stored size of each chunk, delta chunks) of one committed batch."""
        encoded = [(key, future.result()) for key, future in pending]
        written = self._repo.put_chunks(encoded, limit=BATCH_BYTES)
        deltas = sum(is_delta_value(value) for _, value in encoded)
        return written, [(key, len(value)) for key, value in encoded], deltas

    def _collect(self) -> None:
        """Wait for the batch being written, and count it."""
        if self._writing is None:
            return
        writing, self._writing = self._writing, None
        written, sizes, deltas = writing.result()
        self.new_bytes += written
        self.new_chunks += len(sizes)
        self.delta_chunks += deltas
        self.sizes.update(sizes)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=True)


def _as_delta(chunk: PreparedChunk, deltas: DeltaEncoder, base: ChunkRef, dtype: str) -> PreparedChunk:
    """`chunk`, its stored value made the smaller of itself and its delta against `base` (on the
    encoding pool, like any stored value)."""
    return replace(
        chunk, stored_value=lambda: deltas.smaller(chunk.decoded, chunk.stored_value(), base, dtype)
    )


def choose_base(repo: Repository, model: ModelSource, spec: str | None, ref: str | None) -> Snapshot | None:
    """The snapshot new chunks are stored as deltas against (`pack(base=...)`): the one `spec`
    names, or with `AUTO_BASE` the first snapshot at a ref (`ref`'s first) holding exactly the
    model's tensors, or None."""
    if spec is None:
        return None
    if spec != AUTO_BASE:
        return repo.snapshot(repo.resolve(spec))
    wanted = {
        tensor.name: (tensor.dtype, tensor.shape) for source in model.files for tensor in source.tensors
    }
    refs = repo.refs()
    order = sorted(refs, key=lambda name: name != ref)
    for snapshot_id in dict.fromkeys(refs[name] for name in order):
        try:
            candidate = repo.snapshot(snapshot_id)
        except BlockstoreError:  # a damaged catalog is verify's to report, not pack's
            continue
        if {name: (e.dtype, e.shape) for name, e in candidate.tensors.items()} == wanted:
            return candidate
    return None


def _pack_tensor(
    handle: int,
    source: SafetensorsFile,
    tensor: TensorInfo,
    codec: Codec,
    chunk_size: int,
    writer: _ChunkWriter,
    progress: Progress,
    deltas: DeltaEncoder | None = None,
) -> tuple[tuple[ChunkRef, ...], bytes, TensorError | None]:
    """Cut one tensor into chunks, encode, key and hash each, and hand it to `writer`: (the chunks,
    stored lengths not yet known, their chunk-list digest, the error of a lossy codec). With
    `deltas`, a new chunk is stored as a delta against its base chunk where that is smaller."""
    meter = ErrorMeter(tensor.dtype) if is_lossy(codec) else None
    ranges = chunk_ranges(tensor.dtype, tensor.shape, tensor.nbytes, chunk_size)
    lengths = [end - start for start, end in ranges]
    bases = (
        deltas.bases_of(tensor.name, tensor.dtype, tensor.shape, lengths)
        if deltas and not is_lossy(codec)
        else None
    )
    chunks = []
    for index, (start, end) in enumerate(ranges):
        raw = read_range(handle, source.data_start + tensor.begin + start, end - start, source.path)
        try:
            chunk = prepare_chunk(codec, raw)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{source.path}: tensor {tensor.name!r}: {exc}") from None
        if bases is not None and deltas is not None and bases[index].key != chunk.key:
            chunk = _as_delta(chunk, deltas, bases[index], tensor.dtype)
        if meter is not None:
            meter.add(raw, chunk.decoded)
        strong = strong_digest(chunk.decoded)
        writer.add(chunk, codec, strong, tensor.name)
        chunks.append(ChunkRef(chunk.key, chunk.raw_len, 0, strong))
        progress.advance(chunk.raw_len, tensor.name)
    error = None
    if meter is not None:
        measured = meter.result()
        error = TensorError(measured.max_abs, measured.rel_frobenius)
    refs = tuple(chunks)
    return refs, merkle_digest(tensor.dtype, tensor.shape, refs), error


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
    base: str | None = AUTO_BASE,
) -> PackResult:
    """Pack safetensors files (or a model directory) into `repo` and point `ref` at the result.

    With `ref=None` the snapshot is stored but no ref moves (`diff` packs a file on the fly so).
    `chunk_size` defaults to the store's own, so versions of a model dedup against each other.
    `policy` decides each tensor's side and tier (default: the built-in rules, everything lossless);
    `codec` is the lossless codec. `base` (a ref or snapshot id, `AUTO_BASE`, or None for none) is
    the snapshot new lossless chunks may be stored as deltas against (see `choose_base`).
    """
    started = time.perf_counter()
    if ref is not None:
        check_ref_name(ref)
    options = _Options(codec, level, chunk_size or repo.chunk_size, workers, policy or Policy())
    check_chunk_size(options.chunk_size)
    codec_for(codec, "F32", level)  # refuse a bad codec or level before reading anything
    model = discover(inputs)
    decisions = plan(model, options.policy)
    codecs = {  # every tensor's codec, lossless or lossy, chosen (and checked) before any write
        tensor.name: _codec_of(decisions[tensor.name], tensor.dtype, options)
        for source in model.files
        for tensor in source.tensors
    }
    notes = [] if chunk_size is None else _chunk_size_notes(chunk_size, repo.chunk_size)
    base_snapshot = choose_base(repo, model, base, ref)
    with repo.writer_lease():
        result = _pack_model(
            repo, model, ref, message, options, decisions, codecs, progress or Silent(), base_snapshot
        )
    return replace(result, seconds=time.perf_counter() - started, notes=notes + result.notes)


@dataclass(frozen=True)
class _Options:
    codec: str
    level: int
    chunk_size: int
    workers: int | None
    policy: Policy


def _codec_of(decision: Decision, dtype: str, options: _Options) -> Codec:
    """The codec of a tensor: its tier's lossy codec, or the lossless one `--codec` names."""
    if decision.tier == LOSSLESS:
        return codec_for(options.codec, dtype, options.level)
    return lossy_codec(decision.tier, dtype, options.policy.block_size, options.level)


def _pack_model(
    repo: Repository,
    model: ModelSource,
    ref: str | None,
    message: str,
    options: _Options,
    decisions: dict[str, Decision],
    codecs: dict[str, Codec],
    progress: Progress,
    base: Snapshot | None,
) -> PackResult:
    expected = repo.ref(ref) if ref is not None else None
    deltas = DeltaEncoder(repo, base, options.level) if base is not None else None
    progress.start("pack", sum(source.nbytes for source in model.files))
    writer = _ChunkWriter(repo, options.workers or os.cpu_count() or 1)
    packed: dict[str, tuple[TensorInfo, tuple[ChunkRef, ...], bytes, TensorError | None]] = {}
    try:
        for source in model.files:
            handle = open_regular(source.path)
            try:
                check_unchanged(source, handle)  # not replaced since it was validated
                for tensor in source.tensors:
                    packed[tensor.name] = (
                        tensor,
                        *_pack_tensor(
                            handle,
                            source,
                            tensor,
                            codecs[tensor.name],
                            options.chunk_size,
                            writer,
                            progress,
                            deltas,
                        ),
                    )
                check_unchanged(source, handle)  # not written to while it was read
            finally:
                os.close(handle)
        writer.flush(wait=True)
    finally:
        writer.close()
    entries = {
        name: TensorEntry(
            name=name,
            dtype=tensor.dtype,
            shape=tensor.shape,
            side=decisions[name].side,
            tier=decisions[name].tier,
            codec=codecs[name].id,
            chunks=tuple(replace(chunk, stored_len=writer.sizes[chunk.key]) for chunk in chunks),
            digest=tensor_digest,
            error=error,
            merkle=True,
        )
        for name, (tensor, chunks, tensor_digest, error) in packed.items()
    }
    files = tuple(
        SourceFile(source.path.name, source.header, tuple(t.name for t in source.tensors))
        for source in model.files
    )
    snapshot = Snapshot(files, entries, model.extras, expected, message, time.time_ns())
    notes = _reuse_notes(repo, options.codec, writer.reused)  # before this snapshot is stored
    unchanged = expected is not None and _same_content(repo.snapshot(expected), snapshot)
    if unchanged and expected is not None:  # (unchanged implies it)
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
        delta_base=base.id if base is not None and writer.delta_chunks else None,
        delta_chunks=writer.delta_chunks,
        decisions=decisions,
        groups=group_stats(entries.values()),
        notes=notes,
    )


def _chunk_size_notes(asked: int, store: int) -> list[str]:
    if asked == store:
        return []
    return [
        f"--chunk-size {asked} differs from the store's chunk size {store} (set at init): tensors cut "
        f"into {asked}-byte chunks never dedup against chunks cut at {store} bytes, already stored or "
        "packed later with the store's size"
    ]


def _reuse_notes(repo: Repository, codec: str, reused: dict[ChunkKey, str]) -> list[str]:
    """A note when chunks this pack reused from the store are stored under another codec than the
    one asked for: a chunk is stored once, so `--codec` reaches only chunks the store lacked. Chunks
    stored raw are not counted (any lossless codec keeps a chunk raw when encoding does not pay)."""
    if not reused:
        return []
    stored = _stored_codecs(repo, set(reused))
    others = Counter(stored_as for key, stored_as in stored.items() if stored_as not in (reused[key], Raw.id))
    if not others:
        return []
    kinds = ", ".join(f"{count} under {codec_id}" for codec_id, count in sorted(others.items()))
    return [
        f"--codec {codec} applies to new chunks only: {len(reused)} chunks were already in the store "
        f"and were reused as stored, {kinds}"
    ]


def _stored_codecs(repo: Repository, wanted: set[ChunkKey]) -> dict[ChunkKey, str]:
    """The codec each chunk in `wanted` is stored under, from the catalog, without reading a chunk.

    A tensor's codec is the one its pack asked for, which chunks it reused need not have; the pack
    that wrote a chunk is the oldest snapshot that references it, so snapshots are searched oldest
    first. A chunk of a lossless tensor whose stored length is that of a raw chunk was kept raw.
    """
    found: dict[ChunkKey, str] = {}
    try:
        oldest_first = [info.id for info in repo.snapshots()]
    except BlockstoreError:  # a damaged catalog is verify's to report, not pack's
        return found
    for snapshot_id in oldest_first:
        try:
            snapshot = repo.snapshot(snapshot_id)
        except BlockstoreError:
            continue
        for entry in snapshot.tensors.values():
            for chunk in entry.chunks:
                if chunk.key in wanted and chunk.key not in found:
                    kept_raw = entry.tier == LOSSLESS and chunk.stored_len == raw_value_len(chunk.raw_len)
                    found[chunk.key] = Raw.id if kept_raw else entry.codec
        if len(found) == len(wanted):
            break
    return found


def _same_content(old: Snapshot, new: Snapshot) -> bool:
    """True when publishing `new` would add nothing but a timestamp to `old`."""
    return (old.files, dict(old.tensors), dict(old.extras)) == (
        new.files,
        dict(new.tensors),
        dict(new.extras),
    )

"""`diff`: a bundle that turns a store holding OLD into one holding NEW.

It ships only the chunks OLD's snapshot does not reference, plus NEW's snapshot record; a chunk
stored as a delta ships so (with its base unless OLD has it), and one stored whole ships as a delta
against OLD's chunk at the same place where that is smaller. OLD and NEW
may be refs, snapshot ids (unique prefixes accepted) or safetensors files/model directories, which
are packed into the store on the fly as snapshots no ref points at (no ref moves); the result's
notes say which snapshot each became, since it stays in the store until a gc removes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from blockstore.core.chunks import delta_base, encode_chunk
from blockstore.core.manifests import ChunkRef, Snapshot, SnapshotId
from blockstore.core.policy import LOSSLESS
from blockstore.ops.deltas import DeltaEncoder
from blockstore.ops.gc import reachable_snapshots
from blockstore.ops.pack import DEFAULT_CODEC, codec_for, pack
from blockstore.repo import Repository
from blockstore.storage.base import short_id

from .bundle import BundleChunk, write_bundle


@dataclass(frozen=True)
class TensorChanges:
    changed: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def total(self) -> int:
        return len(self.changed) + len(self.added) + len(self.removed)


@dataclass(frozen=True)
class DiffResult:
    base: SnapshotId
    target: SnapshotId
    changes: TensorChanges
    chunks_shipped: int
    bundle_bytes: int
    model_stored_bytes: int
    model_raw_bytes: int
    notes: list[str] = field(default_factory=list)
    """What the user should be told: a file given as OLD or NEW was packed into the store."""

    def to_json(self) -> dict[str, object]:
        return {
            "base": self.base.hex(),
            "target": self.target.hex(),
            "changed": list(self.changes.changed),
            "added": list(self.changes.added),
            "removed": list(self.changes.removed),
            "chunks_shipped": self.chunks_shipped,
            "bundle_bytes": self.bundle_bytes,
            "model_stored_bytes": self.model_stored_bytes,
            "model_raw_bytes": self.model_raw_bytes,
            "notes": list(self.notes),
        }


def tensor_changes(old: Snapshot, new: Snapshot) -> TensorChanges:
    """Which tensors differ between two snapshots (by content digest, dtype and shape). A tensor
    digest of a version 3 snapshot (over the chunk list) and one of an older snapshot (over the
    bytes) cannot be compared, so across versions a tensor counts as unchanged when its dtype,
    shape and chunk keys are (a report, not a check: keys are fast hashes)."""

    def changed(name: str) -> bool:
        before, after = old.tensors[name], new.tensors[name]
        if (before.dtype, before.shape) != (after.dtype, after.shape):
            return True
        if before.merkle == after.merkle:
            return before.digest != after.digest
        return [(c.key, c.raw_len) for c in before.chunks] != [(c.key, c.raw_len) for c in after.chunks]

    common = old.tensors.keys() & new.tensors.keys()
    return TensorChanges(
        changed=tuple(sorted(n for n in common if changed(n))),
        added=tuple(sorted(new.tensors.keys() - old.tensors.keys())),
        removed=tuple(sorted(old.tensors.keys() - new.tensors.keys())),
    )


def resolve_version(
    repo: Repository, spec: str, notes: list[str] | None = None, base: SnapshotId | None = None
) -> SnapshotId:
    """A ref, an id (prefix), or a path to a model that is packed on the fly (its new chunks as
    deltas against `base` where that pays). Packing stores a snapshot the user never asked for, so
    it appends a line to `notes` naming that snapshot."""
    path = Path(spec)
    if not (path.suffix == ".safetensors" or path.is_dir()):
        return repo.resolve(spec)
    message = f"packed by diff from {path.name}"
    snapshot_id = pack(repo, [path], ref=None, message=message, base=base.hex() if base else None).snapshot_id
    if notes is not None:
        fate = (
            "it stays while a ref or reader reaches it"
            if snapshot_id in reachable_snapshots(repo, None)
            else "no ref points at it, so the next gc removes it"
        )
        notes.append(f"packed {path} into the store as snapshot {short_id(snapshot_id)} ({fate})")
    return snapshot_id


DIFF_LEVEL = 3
"""zstd level of the deltas `diff` makes for chunks the store holds whole."""


def _deltas_against(
    repo: Repository, base: Snapshot, target: Snapshot, have: set[bytes], whole: set[bytes]
) -> Callable[[bytes, bytes], bytes]:
    """value → what to ship instead: for a chunk the store holds whole (`whole`), a delta against
    the chunk at the same place of OLD, when that is smaller and its base is a chunk the receiver
    holds (so a target packed without deltas still ships as one)."""
    encoder = DeltaEncoder(repo, base, DIFF_LEVEL)
    places: dict[bytes, tuple[str, ChunkRef, ChunkRef]] = {}
    for entry in target.tensors.values():
        if entry.tier != LOSSLESS:
            continue
        bases = encoder.bases_of(entry.name, entry.dtype, entry.shape, [c.raw_len for c in entry.chunks])
        for chunk, old in zip(entry.chunks, bases or (), strict=False):
            if chunk.key in whole and old.key != chunk.key:
                places.setdefault(chunk.key, (entry.dtype, chunk, old))

    def ship(key: bytes, value: bytes) -> bytes:
        place = places.get(key)
        if place is None:
            return value
        dtype, chunk, old = place
        delta = encoder.smaller(repo.read_chunk(chunk), value, old, dtype)
        return delta if delta_base(delta) in have else value

    return ship


def _whole(repo: Repository, target: Snapshot, stored_deltas: set[bytes]) -> Callable[[bytes, bytes], bytes]:
    """value → what to ship instead: a chunk stored as a delta, decoded and encoded on its own with
    the default codec (deltas are lossless chunks, so the bytes and the key stay the same)."""
    places = {
        chunk.key: (entry, chunk)
        for entry in target.tensors.values()
        for chunk in entry.chunks
        if chunk.key in stored_deltas
    }

    def ship(key: bytes, value: bytes) -> bytes:
        place = places.get(key)
        if place is None:
            return value
        entry, chunk = place
        return encode_chunk(
            codec_for(DEFAULT_CODEC, entry.dtype, DIFF_LEVEL), memoryview(repo.read_chunk(chunk))
        )

    return ship


def diff(
    repo: Repository, old: str, new: str, out: Path, *, key: bytes | None = None, deltas: bool = True
) -> DiffResult:
    """Write the bundle that upgrades OLD to NEW; returns what it holds. With `deltas` off it
    ships whole chunks only (a version 3 bundle, for receivers that predate delta chunks)."""
    notes: list[str] = []
    base_id = resolve_version(repo, old, notes)
    target_id = resolve_version(repo, new, notes, base=base_id if deltas else None)
    base, target = repo.snapshot(base_id), repo.snapshot(target_id)
    have = base.chunk_keys()
    shipped: dict[bytes, BundleChunk] = {}
    for entry in target.tensors.values():
        for chunk in entry.chunks:
            if chunk.key not in have and chunk.key not in shipped:
                shipped[chunk.key] = BundleChunk(chunk.key, chunk.raw_len, chunk.stored_len)
    # A delta chunk ships as it is stored; its base with it, unless OLD (which the receiver holds)
    # references that base already.
    stored_deltas = repo.delta_bases(shipped)
    if deltas:
        for delta_key, its_base in stored_deltas.items():
            if its_base not in have and its_base not in shipped:
                raw_len = shipped[delta_key].raw_len
                size = repo.stored_sizes([its_base]).get(its_base, 0)
                shipped[its_base] = BundleChunk(its_base, raw_len, size)
        shipping = _deltas_against(repo, base, target, have, set(shipped) - set(stored_deltas))
    else:
        shipping = _whole(repo, target, set(stored_deltas))
    # Stored values go out unchecked: `apply` decodes and checks every one before it writes.
    stored = zip(shipped.values(), repo.stored_values(shipped), strict=True)
    values = ((chunk, shipping(chunk.key, value)) for chunk, value in stored)
    snapshot_bytes = repo.snapshot_bytes(target_id)
    size = write_bundle(out, base_id, base.content_id, target_id, snapshot_bytes, values, key)
    return DiffResult(
        base=base_id,
        target=target_id,
        changes=tensor_changes(base, target),
        chunks_shipped=len(shipped),
        bundle_bytes=size,
        model_stored_bytes=target.stored_bytes,
        model_raw_bytes=target.nbytes,
        notes=notes,
    )

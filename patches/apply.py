"""`apply`: check a bundle completely, and only then add its chunks and move the ref.

Order: footer and MAC → format → base matches the ref → target snapshot parses and hashes to its
id → every chunk the target needs is shipped or present → every target tensor is decoded (shipped
chunks from the bundle, the rest from the store), each chunk checked against its key and each
tensor against its digest; a shipped chunk whose key the store already has must carry the same bytes
(xxh3 is not collision resistant) → only now: chunks inserted → snapshot written → ref moved with
compare-and-set. A refused bundle writes nothing at all; a crash during the writes leaves the ref,
and so everything readable, as it was, with at worst unreferenced chunks for `gc`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from blockstore.core.chunks import decode_chunk
from blockstore.core.hashing import ChunkKey, digest, new_digest
from blockstore.core.manifests import ChunkRef, ManifestError, Snapshot, SnapshotId
from blockstore.errors import BlockstoreError, BundleRejected, WrongBase
from blockstore.repo import DEFAULT_REF, Repository, check_ref_name
from blockstore.storage.base import short_id

from .bundle import Bundle, BundleChunk, read_bundle


@dataclass(frozen=True)
class ApplyResult:
    ref: str
    old: SnapshotId | None
    new: SnapshotId
    chunks_added: int
    bytes_added: int

    def to_json(self) -> dict[str, object]:
        return {
            "ref": self.ref,
            "old": self.old.hex() if self.old else None,
            "new": self.new.hex(),
            "chunks_added": self.chunks_added,
            "bytes_added": self.bytes_added,
        }


def _check_base(
    repo: Repository, bundle: Bundle, ref: str, current: SnapshotId | None, force_base: bool
) -> None:
    """The ref must hold the bundle's base: the same snapshot, or the same model content packed
    separately (another store's pack of the same file has another id but the same content)."""
    if bundle.base == current:
        return
    if current is not None and bundle.base_content == repo.snapshot(current).content_id:
        return
    if force_base and bundle.base is not None and repo.has_snapshot(bundle.base):
        return
    base = short_id(bundle.base) if bundle.base else "(none)"
    raise WrongBase(bundle.path.name, base, ref, short_id(current))


def _verified_shipment(repo: Repository, bundle: Bundle, target: Snapshot) -> list[BundleChunk]:
    """Decode and check every tensor of the target before anything is written; returns the shipped
    chunks the store lacks. Raises BundleRejected naming the first problem."""
    shipped = {chunk.key: chunk for chunk in bundle.chunks}
    needed = target.chunk_keys()
    present = repo.has_chunks(needed | shipped.keys())
    absent = needed - shipped.keys() - present
    if absent:
        raise BundleRejected(
            bundle.path, f"target needs chunk {min(absent).hex()} which neither the bundle nor the store has"
        )
    unused = shipped.keys() - needed
    if unused:
        raise BundleRejected(bundle.path, f"ships chunk {min(unused).hex()} which the target does not use")
    with open(bundle.path, "rb") as handle:
        for entry in target.tensors.values():
            hasher = new_digest()
            for chunk in entry.chunks:
                try:
                    hasher.update(_decoded(repo, bundle, handle, shipped, present, chunk))
                except BundleRejected:
                    raise
                except BlockstoreError as exc:
                    raise BundleRejected(bundle.path, f"tensor {entry.name!r}: {exc}") from None
            if hasher.digest() != entry.digest:
                raise BundleRejected(bundle.path, f"tensor {entry.name!r} does not match its digest")
    return [chunk for key, chunk in shipped.items() if key not in present]


def _decoded(
    repo: Repository,
    bundle: Bundle,
    handle: BinaryIO,
    shipped: dict[ChunkKey, BundleChunk],
    present: set[ChunkKey],
    chunk: ChunkRef,
) -> bytearray:
    """A target chunk's raw bytes, from the bundle if shipped, else from the store."""
    if chunk.key not in shipped:
        return repo.read_chunk(chunk)
    handle.seek(shipped[chunk.key].offset)
    raw = decode_chunk(chunk.key, handle.read(shipped[chunk.key].stored_len), chunk.raw_len)
    if chunk.key in present:
        held = repo.read_chunk(chunk)
        if digest(held) != digest(raw):
            raise BundleRejected(
                bundle.path, f"chunk {chunk.key.hex()} collides with a stored chunk of other bytes"
            )
    return raw


def _shipped_values(bundle: Bundle, chunks: list[BundleChunk]) -> Iterator[tuple[ChunkKey, bytes]]:
    """(key, stored value) of `chunks`, read from the bundle in file order."""
    wanted = {chunk.key for chunk in chunks}
    return ((chunk.key, value) for chunk, value in bundle.chunk_values() if chunk.key in wanted)


def apply(
    repo: Repository,
    bundle_path: Path,
    *,
    ref: str = DEFAULT_REF,
    key: bytes | None = None,
    force_base: bool = False,
) -> ApplyResult:
    """Apply a bundle to `ref`; raises (and changes nothing readable) unless every check passes."""
    check_ref_name(ref)
    bundle = read_bundle(bundle_path, key)
    current = repo.ref(ref)
    if current == bundle.target:  # applied already (e.g. re-run after a crash): nothing to do
        return ApplyResult(ref, current, bundle.target, 0, 0)
    _check_base(repo, bundle, ref, current, force_base)
    try:
        target = Snapshot.from_bytes(bundle.snapshot)
    except ManifestError as exc:
        raise BundleRejected(bundle_path, f"target snapshot: {exc}") from None
    with repo.writer_lease():
        new_chunks = _verified_shipment(repo, bundle, target)
        added = repo.put_chunks(_shipped_values(bundle, new_chunks))
        repo.store_snapshot_bytes(bundle.snapshot)  # read_bundle checked it hashes to bundle.target
        repo.move_ref(ref, bundle.target, current, "apply", target.message)
    return ApplyResult(ref, current, bundle.target, len(new_chunks), added)

"""`apply`: check a bundle completely, add its chunks, and only then move the ref.

Order: footer and MAC → format → base matches the ref → target snapshot parses and hashes to its
id → every shipped chunk decodes to its key, and one whose key the store already has must carry
the same bytes (xxh3 is not collision resistant) → every chunk the target needs is shipped or
present → chunks inserted → every target tensor re-read and checked against its digest → snapshot
written → ref moved with compare-and-set. A failure at any step leaves the ref, and so everything
readable, exactly as it was; at worst unreferenced chunks remain for `gc`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blockstore.chunks import decode_chunk
from blockstore.errors import BlockstoreError, BundleRejected, WrongBase
from blockstore.hashing import digest
from blockstore.manifests import ManifestError, Snapshot, SnapshotId
from blockstore.repo import DEFAULT_REF, Repository, check_ref_name

from .bundle import Bundle, read_bundle

_BATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class ApplyResult:
    ref: str
    old: SnapshotId | None
    new: SnapshotId
    chunks_added: int
    bytes_added: int


def _check_base(
    repo: Repository, bundle: Bundle, ref: str, current: SnapshotId | None, force_base: bool
) -> None:
    """The ref must hold the bundle's base: the same snapshot, or the same model content packed
    separately (another store's pack of the same file has another id but the same content)."""
    if bundle.base == current:
        return
    if current is not None and bundle.base_content == repo.snapshot(current).content_id:
        return
    if force_base and bundle.base is not None and repo.store.get_snapshot_bytes(bundle.base) is not None:
        return
    raise WrongBase(
        bundle.path.name,
        bundle.base.hex()[:12] if bundle.base else "(none)",
        ref,
        current.hex()[:12] if current else "(nothing)",
    )


def _checked_chunks(repo: Repository, bundle: Bundle) -> list[tuple[bytes, bytes]]:
    """(key, stored value) of every shipped chunk the store lacks, each proven to decode to its key."""
    new = []
    existing = repo.store.contains(chunk.key for chunk in bundle.chunks)
    for chunk, value in bundle.chunk_values():
        try:
            raw = decode_chunk(chunk.key, value, chunk.raw_len)
            if chunk.key in existing:
                held = decode_chunk(chunk.key, repo.store.get(chunk.key), chunk.raw_len)
                if digest(held) != digest(raw):
                    raise BundleRejected(
                        bundle.path, f"chunk {chunk.key.hex()} collides with a stored chunk of other bytes"
                    )
            else:
                new.append((chunk.key, value))
        except BundleRejected:
            raise
        except BlockstoreError as exc:
            raise BundleRejected(bundle.path, exc) from None
    return new


def _insert(repo: Repository, chunks: list[tuple[bytes, bytes]]) -> int:
    """Insert chunks in transactions of bounded size; returns bytes written."""
    added = 0
    batch: list[tuple[bytes, bytes]] = []
    batch_bytes = 0
    for key, value in chunks:
        batch.append((key, value))
        batch_bytes += len(value)
        if batch_bytes >= _BATCH_BYTES:
            added += repo.store.put_batch(batch)
            batch, batch_bytes = [], 0
    return added + repo.store.put_batch(batch)


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
    current = repo.store.get_ref(ref)
    if current == bundle.target:  # applied already (e.g. re-run after a crash): nothing to do
        return ApplyResult(ref, current, bundle.target, 0, 0)
    _check_base(repo, bundle, ref, current, force_base)
    try:
        target = Snapshot.from_bytes(bundle.snapshot)
    except ManifestError as exc:
        raise BundleRejected(bundle_path, f"target snapshot: {exc}") from None
    with repo.writer_lease():
        new_chunks = _checked_chunks(repo, bundle)
        shipped = {key for key, _ in new_chunks}
        needed = target.chunk_keys()
        absent = needed - shipped - repo.store.contains(needed - shipped)
        if absent:
            raise BundleRejected(
                bundle_path,
                f"target needs chunk {min(absent).hex()} which neither the bundle nor the store has",
            )
        added = _insert(repo, new_chunks)
        for entry in target.tensors.values():
            repo.check_tensor(bundle.target, entry)
        repo.store.put_snapshot(bundle.target, bundle.snapshot)
        repo.store.move_ref(ref, bundle.target, current, "apply", target.message)
    return ApplyResult(ref, current, bundle.target, len(new_chunks), added)

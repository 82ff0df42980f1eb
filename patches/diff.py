"""`diff`: a bundle that turns a store holding OLD into one holding NEW.

It ships only the chunks OLD's snapshot does not reference, plus NEW's snapshot record. OLD and NEW
may be refs, snapshot ids (unique prefixes accepted) or safetensors files/model directories, which
are packed into the store on the fly (no ref moves).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blockstore.core.manifests import Snapshot, SnapshotId
from blockstore.ops.pack import pack
from blockstore.repo import Repository

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
        }


def tensor_changes(old: Snapshot, new: Snapshot) -> TensorChanges:
    """Which tensors differ between two snapshots (by content digest, dtype and shape)."""

    def identity(snapshot: Snapshot, name: str) -> tuple:
        entry = snapshot.tensors[name]
        return entry.digest, entry.dtype, entry.shape

    common = old.tensors.keys() & new.tensors.keys()
    return TensorChanges(
        changed=tuple(sorted(n for n in common if identity(old, n) != identity(new, n))),
        added=tuple(sorted(new.tensors.keys() - old.tensors.keys())),
        removed=tuple(sorted(old.tensors.keys() - new.tensors.keys())),
    )


def resolve_version(repo: Repository, spec: str) -> SnapshotId:
    """A ref, an id (prefix), or a path to a model that is packed on the fly."""
    path = Path(spec)
    if path.suffix == ".safetensors" or path.is_dir():
        return pack(repo, [path], ref=None, message=f"packed by diff from {path.name}").snapshot_id
    return repo.resolve(spec)


def diff(repo: Repository, old: str, new: str, out: Path, *, key: bytes | None = None) -> DiffResult:
    """Write the bundle that upgrades OLD to NEW; returns what it holds."""
    base_id, target_id = resolve_version(repo, old), resolve_version(repo, new)
    base, target = repo.snapshot(base_id), repo.snapshot(target_id)
    have = base.chunk_keys()
    shipped: dict[bytes, BundleChunk] = {}
    for entry in target.tensors.values():
        for chunk in entry.chunks:
            if chunk.key not in have and chunk.key not in shipped:
                shipped[chunk.key] = BundleChunk(chunk.key, chunk.raw_len, chunk.stored_len)
    values = ((chunk, repo.store.get(chunk.key)) for chunk in shipped.values())
    snapshot_bytes = repo.store.get_snapshot_bytes(target_id) or b""  # repo.snapshot checked it exists
    size = write_bundle(out, base_id, base.content_id, target_id, snapshot_bytes, values, key)
    return DiffResult(
        base=base_id,
        target=target_id,
        changes=tensor_changes(base, target),
        chunks_shipped=len(shipped),
        bundle_bytes=size,
        model_stored_bytes=target.stored_bytes,
        model_raw_bytes=target.nbytes,
    )

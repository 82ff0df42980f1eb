"""How much of a snapshot is stored as delta chunks, and against which snapshots (`show`, `stats`).

Whether a chunk is a delta is a property of its stored value in this store (the snapshot names only
keys: the same chunk may be a delta here and whole in a store it was copied to), so this reads each
chunk's envelope — cheap on LMDB, one GET per chunk on an object store, and nothing at all in a
store not marked as holding deltas.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from blockstore.core.hashing import ChunkKey
from blockstore.core.manifests import Snapshot, SnapshotId
from blockstore.errors import BlockstoreError
from blockstore.repo import Repository


@dataclass(frozen=True)
class DeltaSummary:
    """The distinct chunks of a snapshot, those stored as deltas, and where their bases come from."""

    chunks: int
    stored_bytes: int
    delta_chunks: int
    delta_stored_bytes: int
    bases: dict[SnapshotId | None, int]
    """Base chunks by the oldest snapshot that references them (None: kept only as bases)."""
    per_tensor: dict[str, int]
    """Chunks of each tensor stored as deltas (tensors with none are left out)."""

    def to_json(self) -> dict[str, object]:
        return {
            "chunks": self.chunks,
            "stored_bytes": self.stored_bytes,
            "delta_chunks": self.delta_chunks,
            "delta_stored_bytes": self.delta_stored_bytes,
            "bases": [
                {"snapshot": snapshot_id.hex() if snapshot_id else None, "chunks": count}
                for snapshot_id, count in self.bases.items()
            ],
        }


def delta_summary(repo: Repository, snapshot: Snapshot) -> DeltaSummary:
    """What of `snapshot` is stored as deltas in `repo`, and against what."""
    sizes = {chunk.key: chunk.stored_len for entry in snapshot.tensors.values() for chunk in entry.chunks}
    bases = repo.delta_bases(sizes)
    stored = repo.stored_sizes(bases) if bases else {}
    per_tensor = {
        entry.name: count
        for entry in snapshot.tensors.values()
        if (count := sum(chunk.key in bases for chunk in entry.chunks))
    }
    return DeltaSummary(
        chunks=len(sizes),
        stored_bytes=sum(sizes.values()),
        delta_chunks=len(bases),
        delta_stored_bytes=sum(stored.values()),
        bases=_base_snapshots(repo, set(bases.values())),
        per_tensor=per_tensor,
    )


def _base_snapshots(repo: Repository, keys: set[ChunkKey]) -> dict[SnapshotId | None, int]:
    """How many of `keys` each snapshot references first (oldest first), the rest under None."""
    found: Counter[SnapshotId | None] = Counter()
    remaining = set(keys)
    if remaining:
        try:
            infos = repo.snapshots()
        except BlockstoreError:  # a damaged catalog is verify's to report
            infos = []
        for info in infos:
            held = remaining & repo.snapshot(info.id).chunk_keys()
            if held:
                found[info.id] += len(held)
                remaining -= held
    if remaining:
        found[None] += len(remaining)
    return dict(found)

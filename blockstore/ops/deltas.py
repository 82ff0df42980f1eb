"""Delta chunks above the chunk format: choosing what a new chunk is a delta against
(`DeltaEncoder`, shared by `pack` and `diff`), and how much of a snapshot is stored as deltas and
against which snapshots (`delta_summary`, for `show`).

Whether a chunk is a delta is a property of its stored value in this store (the snapshot names only
keys: the same chunk may be a delta here and whole in a store it was copied to), so this reads each
chunk's envelope from the start of its value (`Store.value_start`) — cheap on LMDB, one small
range request per chunk on an object store, and nothing at all in a store not marked as holding
deltas.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from blockstore.core.chunks import delta_value
from blockstore.core.dtypes import plane_count
from blockstore.core.hashing import ChunkKey
from blockstore.core.manifests import ChunkRef, Snapshot, SnapshotId
from blockstore.core.policy import LOSSLESS
from blockstore.errors import BlockstoreError
from blockstore.repo import CHUNK_DAMAGE, Repository


class DeltaEncoder:
    """Stores a chunk as a delta against the chunk at the same place of the same tensor in a base
    snapshot, where that is smaller than the chunk stored on its own (FORMAT.md §1).

    A delta's base is always a chunk that decodes on its own: when the base snapshot's chunk is
    itself a delta, the new one is taken against that chunk's own base, so chains stay one deep
    however many fine-tunes follow one another. Each chunk's choice depends on its bytes alone, so
    a model packs to the same values (and content id) in any store holding the same base."""

    def __init__(self, repo: Repository, base: Snapshot, level: int) -> None:
        self._repo = repo
        self.base = base
        self._level = level

    def bases_of(
        self, name: str, dtype: str, shape: tuple[int, ...], lengths: list[int]
    ) -> tuple[ChunkRef, ...] | None:
        """The base snapshot's chunks of tensor `name`, if it is lossless there, of the same dtype
        and shape, and cut into chunks of these `lengths`."""
        entry = self.base.tensors.get(name)
        if entry is None or entry.tier != LOSSLESS or (entry.dtype, entry.shape) != (dtype, shape):
            return None
        if [chunk.raw_len for chunk in entry.chunks] != lengths:
            return None  # cut at another chunk size
        return entry.chunks

    def smaller(self, raw: bytes | bytearray, plain: bytes, base: ChunkRef, dtype: str) -> bytes:
        """The smaller of `plain` (the chunk's value on its own) and its delta against `base`."""
        try:
            root_key, root = self._repo.delta_root(base)
        except CHUNK_DAMAGE:  # verify's to report; the chunk is stored on its own
            return plain
        delta = delta_value(memoryview(raw), root_key, root, plane_count(dtype), self._level)
        return delta if len(delta) < len(plain) else plain


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

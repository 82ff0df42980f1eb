"""`push` / `pull`: copy a ref's snapshot from one store to another, sending only missing chunks.

Both stores may be LMDB directories or object stores. The copy follows the usual write order in the
destination — chunks (checked against their keys on the way), then the snapshot, then the ref with
compare-and-set under a writer lease — so an interrupted copy leaves only unreferenced data there.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockstore.core.chunks import decode_chunk
from blockstore.core.manifests import SnapshotId
from blockstore.errors import ChunkCorrupt, ChunkMissing, TensorCorrupt
from blockstore.repo import DEFAULT_REF, Repository, check_ref_name

_BATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class TransferResult:
    ref: str
    snapshot: SnapshotId
    chunks_sent: int
    bytes_sent: int
    chunks_present: int

    def to_json(self) -> dict[str, object]:
        return {
            "ref": self.ref,
            "snapshot": self.snapshot.hex(),
            "chunks_sent": self.chunks_sent,
            "bytes_sent": self.bytes_sent,
            "chunks_present": self.chunks_present,
        }


def transfer(source: Repository, destination: Repository, ref: str = DEFAULT_REF) -> TransferResult:
    """Make `ref` in `destination` point at the snapshot `ref` names in `source`."""
    check_ref_name(ref)
    with source.reading(ref) as snapshot_id, destination.writer_lease():
        snapshot = source.snapshot(snapshot_id)  # checked against its id
        data = source.store.get_snapshot_bytes(snapshot_id)
        owners = {chunk.key: (entry, chunk) for entry in snapshot.tensors.values() for chunk in entry.chunks}
        present = destination.store.contains(owners)
        missing = [key for key in owners if key not in present]
        sent, batch, batch_bytes = 0, [], 0
        for key, value in zip(missing, source.store.get_many(missing), strict=True):
            entry, chunk = owners[key]
            try:  # never spread a damaged chunk to another store
                decode_chunk(key, value, chunk.raw_len)
            except (ChunkCorrupt, ChunkMissing) as exc:
                raise TensorCorrupt(entry.name, snapshot_id.hex()[:12], exc) from None
            batch.append((key, value))
            batch_bytes += len(value)
            if batch_bytes >= _BATCH_BYTES:
                sent += destination.store.put_batch(batch)
                batch, batch_bytes = [], 0
        sent += destination.store.put_batch(batch)
        destination.store.put_snapshot(snapshot_id, data)
        current = destination.store.get_ref(ref)
        if current != snapshot_id:
            destination.store.move_ref(ref, snapshot_id, current, "pull", snapshot.message)
    return TransferResult(ref, snapshot_id, len(missing), sent, len(present))

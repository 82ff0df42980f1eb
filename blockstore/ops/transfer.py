"""`push` / `pull`: copy a ref's snapshot from one store to another, sending only missing chunks.

Both stores may be LMDB directories or object stores. The copy follows the usual write order in the
destination — chunks (checked against their keys on the way), then the snapshot, then the ref with
compare-and-set under a writer lease — so an interrupted copy leaves only unreferenced data there.

A version 3 snapshot promises each chunk's strong digest. Chunks sent are checked against it, and a
chunk the destination already holds under the same key must be the promised bytes too (keys are
xxh3 and can collide): the destination then vouches for every chunk its snapshots reference.
A delta chunk travels as it is stored, with its base when the destination lacks that.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockstore.core.manifests import ChunkRef, Snapshot, SnapshotId, TensorEntry
from blockstore.errors import ChunkCollision, StoreCorrupt
from blockstore.repo import DEFAULT_REF, Repository, check_ref_name


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
        record = source.snapshot_bytes(snapshot_id)  # shipped as stored: its id stays the same
        owners = {chunk.key: (entry, chunk) for entry in snapshot.tensors.values() for chunk in entry.chunks}
        present = destination.has_chunks(owners)
        _check_present(source, destination, snapshot, present)
        missing = [owners[key] for key in owners if key not in present]
        missing += _missing_bases(source, destination, missing)
        # Each value is decoded once on the way: a damaged chunk is never spread to another store.
        sizes = {chunk.key: chunk.raw_len for _, chunk in missing}
        checked = source.checked_values(snapshot_id, missing)
        sent = destination.put_chunks(
            (key, destination.rooted_value(key, value, sizes[key])) for key, value in checked
        )
        destination.store_snapshot_bytes(record)
        current = destination.ref(ref)
        if current != snapshot_id:
            destination.move_ref(ref, snapshot_id, current, "pull", snapshot.message)
    return TransferResult(ref, snapshot_id, len(missing), sent, len(present))


def _missing_bases(
    source: Repository, destination: Repository, missing: list[tuple[TensorEntry, ChunkRef]]
) -> list[tuple[TensorEntry, ChunkRef]]:
    """The bases of the delta chunks being sent that the destination lacks and that are not sent
    already, each named after the tensor of its delta (a base decodes to as many bytes)."""
    sending = {chunk.key for _, chunk in missing}
    owners = {chunk.key: (entry, chunk) for entry, chunk in missing}
    bases = source.delta_bases(sending)
    present = destination.has_chunks(set(bases.values()))
    extra: dict[bytes, tuple[TensorEntry, ChunkRef]] = {}
    for key, base in bases.items():
        if base not in present and base not in sending and base not in extra:
            entry, chunk = owners[key]
            extra[base] = (entry, ChunkRef(base, chunk.raw_len, 0))
    return list(extra.values())


def _check_present(
    source: Repository, destination: Repository, snapshot: Snapshot, present: set[bytes]
) -> None:
    """Refuse the copy unless each chunk the destination already holds is the chunk the snapshot
    promises (version 3; an older snapshot promises only keys), and the snapshot promises one set
    of bytes per key. Raises before anything is written."""
    promised: dict[bytes, bytes] = {}
    checked: set[bytes] = set()
    digests = destination.stored_digests()
    for entry in snapshot.tensors.values():
        for chunk in entry.chunks:
            if chunk.strong is None:
                continue
            if promised.setdefault(chunk.key, chunk.strong) != chunk.strong:
                detail = f"tensor {entry.name!r}: chunk {chunk.key.hex()} is promised as two byte strings"
                raise StoreCorrupt(source.path, detail)
            if chunk.key in present and chunk.key not in checked:
                checked.add(chunk.key)
                stored = digests.of(chunk.key, chunk.raw_len)
                if stored != chunk.strong:
                    held, wanted = stored.hex()[:16], chunk.strong.hex()[:16]
                    raise ChunkCollision(entry.name, chunk.key.hex(), destination.path, held, wanted)

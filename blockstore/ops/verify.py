"""`verify`: check what a snapshot reaches and name exactly what is damaged.

Two depths, like borg's `check` and `check --verify-data`. The default checks structure: every ref
points at a snapshot that is there and hashes to its id, and every chunk those snapshots reference
is present — quick, reading no chunk data, and what a crash could break. `deep` also decodes every
chunk, checks it against its key, and every tensor against its digest: what a bit flip breaks.

The report distinguishes what is *missing* (a referenced chunk is gone),
*corrupt* (a chunk is there but does not decode to its key), a tensor whose chunks decode but do
not add up to its digest, a damaged snapshot record or a ref pointing at nothing — and *orphans*,
chunks no snapshot references. Orphans are what an interrupted write leaves behind; they are
reported, but they are not damage (`gc` removes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blockstore.core.chunks import decode_chunk
from blockstore.core.hashing import ChunkKey, new_digest
from blockstore.core.manifests import Snapshot, SnapshotId, TensorEntry
from blockstore.errors import BlockstoreError, ChunkCorrupt, ChunkMissing
from blockstore.progress import Progress, Silent
from blockstore.repo import Repository

MISSING = "missing"
CORRUPT = "corrupt"
DIGEST = "digest"
SNAPSHOT = "snapshot"
REF = "ref"


@dataclass(frozen=True)
class Damage:
    """One damaged thing, with everything needed to find it."""

    kind: str
    snapshot: str
    detail: str
    tensor: str | None = None
    chunk: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "snapshot": self.snapshot,
            "detail": self.detail,
            "tensor": self.tensor,
            "chunk": self.chunk,
        }

    def line(self) -> str:
        where = f"snapshot {self.snapshot[:12]}"
        if self.tensor is not None:
            where += f" tensor {self.tensor!r}"
        return f"{self.kind}: {where}: {self.detail}"


@dataclass
class VerifyReport:
    snapshots: int = 0
    tensors: int = 0
    chunks: int = 0
    bytes_checked: int = 0
    """Raw bytes decoded and hashed (deep only)."""
    deep: bool = False
    damages: list[Damage] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.damages

    def to_json(self) -> dict[str, object]:
        return {
            "clean": self.clean,
            "deep": self.deep,
            "snapshots": self.snapshots,
            "tensors": self.tensors,
            "chunks": self.chunks,
            "bytes_checked": self.bytes_checked,
            "damages": [damage.to_json() for damage in self.damages],
            "orphans": list(self.orphans),
        }


def _chunk_problem(repo: Repository, key: ChunkKey, raw_len: int) -> tuple[str, str, bytearray | None]:
    """(kind, detail, raw) for one chunk; kind is empty when the chunk is sound."""
    try:
        return "", "", decode_chunk(key, repo.store.get(key), raw_len)
    except ChunkMissing:
        return MISSING, "is missing", None
    except ChunkCorrupt as exc:
        return CORRUPT, f"is corrupt ({str(exc).split(': ', 1)[-1]})", None


def _check_tensor(repo: Repository, snapshot_id: SnapshotId, entry: TensorEntry, deep: bool) -> Damage | None:
    hasher = new_digest()
    problems = []
    if deep:
        # Fetched and decoded ahead on the store's threads (an object store's round trips overlap).
        checked = repo.store.map_ordered(
            lambda chunk: _chunk_problem(repo, chunk.key, chunk.raw_len), entry.chunks
        )
        for (index, chunk), (kind, detail, raw) in zip(enumerate(entry.chunks), checked, strict=True):
            if raw is None:
                problems.append((index, chunk.key, kind, detail))
            else:
                hasher.update(raw)
    else:
        present = repo.store.stored_sizes(chunk.key for chunk in entry.chunks)
        problems = [
            (index, chunk.key, MISSING, "is missing")
            for index, chunk in enumerate(entry.chunks)
            if chunk.key not in present
        ]
    if problems:
        index, key, kind, detail = problems[0]
        more = f" (and {len(problems) - 1} more damaged chunks)" if len(problems) > 1 else ""
        text = f"chunk {index + 1} of {len(entry.chunks)} (key {key.hex()}) {detail}{more}"
        return Damage(kind, snapshot_id.hex(), text, entry.name, key.hex())
    if deep and hasher.digest() != entry.digest:
        return Damage(
            DIGEST, snapshot_id.hex(), "chunks decode but do not match the tensor digest", entry.name
        )
    return None


def verify(
    repo: Repository, spec: str | None = None, *, deep: bool = False, progress: Progress | None = None
) -> VerifyReport:
    """Check one snapshot (`spec`) or the whole store (every snapshot, every ref, and orphans);
    `deep` decodes and hashes every chunk and tensor as well."""
    progress = progress or Silent()
    report = VerifyReport(deep=deep)
    whole_store = spec is None
    if whole_store:
        targets = repo.store.snapshot_ids()
        known = set(targets)
        for ref, target in sorted(repo.store.refs().items()):
            if target not in known:
                report.damages.append(
                    Damage(REF, target.hex(), f"ref {ref!r} points at a snapshot that is missing")
                )
    else:
        targets = [repo.resolve(spec)]
    snapshots: dict[SnapshotId, Snapshot] = {}
    for snapshot_id in targets:
        try:
            snapshots[snapshot_id] = repo.snapshot(snapshot_id)
        except BlockstoreError as exc:
            report.damages.append(Damage(SNAPSHOT, snapshot_id.hex(), str(exc)))
    progress.start("verify", sum(snapshot.nbytes for snapshot in snapshots.values()))
    referenced: set[ChunkKey] = set()
    checked: dict[tuple[bytes, tuple[ChunkKey, ...]], Damage | None] = {}
    for snapshot_id, snapshot in snapshots.items():
        report.snapshots += 1
        for entry in snapshot.tensors.values():
            keys = tuple(chunk.key for chunk in entry.chunks)
            referenced.update(keys)
            memo = (entry.digest, keys)
            if memo not in checked:
                checked[memo] = _check_tensor(repo, snapshot_id, entry, deep)
                report.chunks += len(keys)
                report.bytes_checked += entry.nbytes if deep else 0
            damage = checked[memo]
            if damage is not None:
                report.damages.append(
                    Damage(damage.kind, snapshot_id.hex(), damage.detail, entry.name, damage.chunk)
                )
            report.tensors += 1
            progress.advance(entry.nbytes, entry.name)
    if whole_store and not any(d.kind == SNAPSHOT for d in report.damages):
        report.orphans = sorted(key.hex() for key in repo.store.iter_keys() if key not in referenced)
    return report

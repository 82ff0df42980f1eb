"""`verify`: check what a snapshot reaches and name exactly what is damaged.

Two depths, like borg's `check` and `check --verify-data`. The default checks structure: every ref
points at a snapshot that is there and hashes to its id, and every chunk those snapshots reference
is present — quick, reading no chunk data, and what a crash could break. `deep` also decodes every
chunk, checks it against its key, and every tensor against its digest: what a bit flip breaks. In a
version 3 snapshot a chunk is checked against its strong digest (which the chunk-list tensor
digest, checked when the snapshot is read, builds on), each distinct chunk once per run however
many tensors and snapshots share it.

The report distinguishes what is *missing* (a referenced chunk is gone),
*corrupt* (a chunk is there but does not decode to its key), a tensor whose chunks decode but do
not add up to its digest, a damaged snapshot record or a ref pointing at nothing — and *orphans*,
chunks no snapshot references. Orphans are what an interrupted write leaves behind; they are
reported, but they are not damage (`gc` removes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blockstore.core.hashing import ChunkKey, new_digest
from blockstore.core.manifests import ChunkRef, Snapshot, SnapshotId, TensorEntry
from blockstore.errors import BlockstoreError, ChunkCorrupt, ChunkMissing
from blockstore.progress import Progress, Silent
from blockstore.repo import CHUNK_DAMAGE, Repository

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


def _problem(damage: ChunkCorrupt | ChunkMissing) -> tuple[str, str]:
    """(kind, detail) of one damaged chunk, the detail worded to follow "chunk N of M (key K)"."""
    if isinstance(damage, ChunkMissing):
        return MISSING, "is missing"
    return CORRUPT, f"is corrupt ({str(damage).split(': ', 1)[-1]})"


ChunkProblem = tuple[str, str] | None
"""(kind, detail) of a damaged chunk, None for a sound one."""


def _check_chunks(repo: Repository, chunks: list[ChunkRef], seen: dict[tuple, ChunkProblem]) -> int:
    """Decode and check the chunks of `chunks` not in `seen` (by key and strong digest), recording
    each one's problem there; returns the raw bytes decoded."""
    todo = list({(c.key, c.strong): c for c in chunks if (c.key, c.strong) not in seen}.values())
    for chunk, raw in zip(todo, repo.checked_chunks(todo), strict=True):
        seen[chunk.key, chunk.strong] = _problem(raw) if isinstance(raw, CHUNK_DAMAGE) else None
    return sum(chunk.raw_len for chunk in todo)


def _check_tensor(
    repo: Repository,
    snapshot_id: SnapshotId,
    entry: TensorEntry,
    deep: bool,
    seen: dict[tuple, ChunkProblem],
    report: VerifyReport,
    lost_bases: dict[ChunkKey, ChunkKey],
) -> Damage | None:
    hasher = new_digest()
    problems = []
    if deep and entry.merkle:
        report.bytes_checked += _check_chunks(repo, list(entry.chunks), seen)
        for index, chunk in enumerate(entry.chunks):
            problem = seen[chunk.key, chunk.strong]
            if problem is not None:
                problems.append((index, chunk.key, *problem))
    elif deep:
        report.bytes_checked += entry.nbytes
        decoded = repo.checked_chunks(entry.chunks)
        for index, (chunk, raw) in enumerate(zip(entry.chunks, decoded, strict=True)):
            if isinstance(raw, CHUNK_DAMAGE):
                problems.append((index, chunk.key, *_problem(raw)))
            else:
                hasher.update(raw)
    else:
        present = repo.has_chunks(chunk.key for chunk in entry.chunks)
        problems = [
            (index, chunk.key, MISSING, "is missing")
            if chunk.key not in present
            else (
                index,
                chunk.key,
                MISSING,
                f"is a delta whose base chunk {lost_bases[chunk.key].hex()} is missing",
            )
            for index, chunk in enumerate(entry.chunks)
            if chunk.key not in present or chunk.key in lost_bases
        ]
    if problems:
        index, key, kind, detail = problems[0]
        more = f" (and {len(problems) - 1} more damaged chunks)" if len(problems) > 1 else ""
        text = f"chunk {index + 1} of {len(entry.chunks)} (key {key.hex()}) {detail}{more}"
        return Damage(kind, snapshot_id.hex(), text, entry.name, key.hex())
    # A chunk-list digest was checked against the chunk list when the snapshot was read.
    if deep and not entry.merkle and hasher.digest() != entry.digest:
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
        targets = repo.snapshot_ids()
        known = set(targets)
        for ref, target in sorted(repo.refs().items()):
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
    # Which chunks are deltas, read once from their envelopes: the quick check finds deltas whose
    # base is gone (a deep one decodes them), and bases count as reached for the orphans.
    bases: dict[ChunkKey, ChunkKey] = {}
    if whole_store or not deep:
        bases = repo.delta_bases(set().union(*(snapshot.chunk_keys() for snapshot in snapshots.values())))
    held = repo.has_chunks(set(bases.values()))
    lost_bases = {key: base for key, base in bases.items() if base not in held}
    referenced: set[ChunkKey] = set()
    checked: dict[tuple[bytes, tuple[ChunkKey, ...]], Damage | None] = {}
    seen: dict[tuple, ChunkProblem] = {}
    for snapshot_id, snapshot in snapshots.items():
        report.snapshots += 1
        for entry in snapshot.tensors.values():
            keys = tuple(chunk.key for chunk in entry.chunks)
            referenced.update(keys)
            memo = (entry.digest, keys)
            if memo not in checked:
                checked[memo] = _check_tensor(repo, snapshot_id, entry, deep, seen, report, lost_bases)
                report.chunks += len(keys)
            damage = checked[memo]
            if damage is not None:
                report.damages.append(
                    Damage(damage.kind, snapshot_id.hex(), damage.detail, entry.name, damage.chunk)
                )
            report.tensors += 1
            progress.advance(entry.nbytes, entry.name)
    if whole_store and not any(d.kind == SNAPSHOT for d in report.damages):
        referenced |= set(bases.values())  # a base is reached through its delta
        report.orphans = sorted(key.hex() for key in repo.chunk_keys() if key not in referenced)
    return report

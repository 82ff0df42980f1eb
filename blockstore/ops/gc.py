"""`gc`: delete snapshots and chunks that no ref, kept reflog entry or live reader reaches.

A chunk is reached by being referenced or by being the base of a referenced delta chunk (found in
the stored values: chains are one deep, so one look per referenced chunk finds every base).

Nothing is deleted by apply or rollback; space comes back only here. The plan (what is unreachable)
is made from a read view; the deletion is one write transaction that first re-checks that no
writer holds a lease (an in-flight pack or apply has chunks no snapshot references yet) and that
no ref moved since the plan was made, and deletes nothing otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockstore.core.hashing import ChunkKey
from blockstore.core.manifests import SnapshotId
from blockstore.errors import InvalidArgument
from blockstore.repo import Repository


@dataclass(frozen=True)
class GcReport:
    kept_snapshots: int
    deleted_snapshots: tuple[str, ...]
    deleted_chunks: int
    freed_bytes: int
    dry_run: bool

    def to_json(self) -> dict[str, object]:
        return {
            "kept_snapshots": self.kept_snapshots,
            "deleted_snapshots": list(self.deleted_snapshots),
            "deleted_chunks": self.deleted_chunks,
            "freed_bytes": self.freed_bytes,
            "dry_run": self.dry_run,
        }


def reachable_snapshots(repo: Repository, keep: int | None) -> set[SnapshotId]:
    """Every ref's target, the targets of its last `keep` reflog entries (all when None), and the
    snapshots live readers have pinned (a lazy model reading an old version keeps it)."""
    refs = repo.refs()
    roots = set(refs.values()) | repo.pinned_snapshots()
    for ref in refs:
        entries = repo.log(ref)
        kept = entries if keep is None else entries[-keep:] if keep > 0 else []
        roots.update(entry.new for entry in kept)
    return roots


def gc(repo: Repository, *, keep: int | None = None, dry_run: bool = False) -> GcReport:
    """Collect garbage; `keep` limits how many reflog positions per ref stay restorable."""
    if keep is not None and keep < 0:
        raise InvalidArgument(f"--keep must be 0 or more, got {keep}")
    fingerprint = repo.roots_fingerprint()
    existing = set(repo.snapshot_ids())
    live = reachable_snapshots(repo, keep) & existing
    referenced: set[ChunkKey] = set()
    for snapshot_id in live:
        referenced |= repo.snapshot(snapshot_id).chunk_keys()
    referenced |= set(repo.delta_bases(referenced).values())  # a kept delta keeps its base
    dead_snapshots = sorted(existing - live)
    dead_chunks = [key for key in repo.chunk_keys() if key not in referenced]
    freed = sum(repo.stored_sizes(dead_chunks).values())
    if not dry_run:
        repo.collect(dead_snapshots, dead_chunks, fingerprint)
    return GcReport(len(live), tuple(s.hex() for s in dead_snapshots), len(dead_chunks), freed, dry_run)

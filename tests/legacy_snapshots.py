"""Snapshots as packs before version 3 wrote them: no strong chunk digests, tensor digests over the
bytes. Built from a stored version 3 snapshot, for tests of how older stores and bundles read."""

from __future__ import annotations

from dataclasses import replace

from blockstore.core.hashing import new_digest
from blockstore.core.manifests import SnapshotId
from blockstore.repo import Repository


def as_version_2(repo: Repository, snapshot_id: SnapshotId, parent: SnapshotId | None = None) -> SnapshotId:
    """Store the version 2 form of snapshot `snapshot_id` (same files, chunks and extras) and
    return its id; no ref moves."""
    snapshot = repo.snapshot(snapshot_id)
    tensors = {}
    for name, entry in snapshot.tensors.items():
        hasher = new_digest()
        for raw in repo.tensor_chunks(snapshot_id, entry):
            hasher.update(raw)
        chunks = tuple(replace(chunk, strong=None) for chunk in entry.chunks)
        tensors[name] = replace(entry, chunks=chunks, digest=hasher.digest(), merkle=False)
    legacy = replace(snapshot, tensors=tensors, parent=parent, version=2)
    return repo.store_snapshot(legacy)

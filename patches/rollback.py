"""`rollback`: move a ref back to an earlier version. Nothing is deleted (that is `gc`'s job)."""

from __future__ import annotations

from dataclasses import dataclass

from blockstore.core.manifests import SnapshotId
from blockstore.errors import InvalidArgument, RefNotFound
from blockstore.repo import DEFAULT_REF, Repository, check_ref_name
from blockstore.storage.base import short_id

from .history import ROLLBACK, version_stack


@dataclass(frozen=True)
class RollbackResult:
    ref: str
    old: SnapshotId
    new: SnapshotId

    def to_json(self) -> dict[str, object]:
        return {"ref": self.ref, "old": self.old.hex(), "new": self.new.hex()}


def rollback(
    repo: Repository, *, ref: str = DEFAULT_REF, to: str | None = None, steps: int = 1
) -> RollbackResult:
    """Point `ref` at `to` (a ref or id), or `steps` versions back along its history."""
    check_ref_name(ref)
    current = repo.ref(ref)
    if current is None:
        raise RefNotFound(ref, repo.path)
    if to is not None:
        target = repo.resolve(to)
    else:
        if steps < 1:
            raise InvalidArgument(f"--steps must be at least 1, got {steps}")
        stack = version_stack(repo, ref)
        if steps >= len(stack):
            raise InvalidArgument(
                f"ref {ref!r} has {len(stack) - 1} earlier versions; cannot go back {steps}"
            )
        target = stack[-1 - steps]
    snapshot = repo.snapshot(target)  # refuse a target gc already collected
    if target == current:  # there already (e.g. `--to X` re-run after a crash): no reflog entry
        return RollbackResult(ref, current, target)
    message = f"rollback to {short_id(target)} {snapshot.message}".strip()
    repo.move_ref(ref, target, current, ROLLBACK, message)
    return RollbackResult(ref, current, target)

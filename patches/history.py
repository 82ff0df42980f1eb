"""A ref's history, read from its reflog: what `log` prints and where `rollback` steps back to."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from blockstore.core.manifests import SnapshotId
from blockstore.errors import BlockstoreError, RefNotFound
from blockstore.repo import Repository

from .diff import tensor_changes

ROLLBACK = "rollback"


@dataclass(frozen=True)
class LogEntry:
    time_ns: int
    old: SnapshotId | None
    new: SnapshotId
    op: str
    message: str
    tensors_changed: int | None
    """None when one side's snapshot is gone (collected by gc)."""

    def to_json(self) -> dict[str, object]:
        moved = datetime.fromtimestamp(self.time_ns / 1e9, tz=timezone.utc)
        return {
            "time": moved.isoformat(timespec="seconds"),
            "old": self.old.hex() if self.old else None,
            "new": self.new.hex(),
            "op": self.op,
            "message": self.message,
            "tensors_changed": self.tensors_changed,
        }


def log(repo: Repository, ref: str) -> list[LogEntry]:
    """Every move of `ref`, oldest first, with how many tensors each move changed."""
    if repo.store.get_ref(ref) is None:
        raise RefNotFound(ref, repo.path)
    entries = []
    for entry in repo.store.reflog(ref):
        try:
            new = repo.snapshot(entry.new)
            changed = (
                len(new.tensors) if entry.old is None else tensor_changes(repo.snapshot(entry.old), new).total
            )
        except BlockstoreError:
            changed = None
        entries.append(LogEntry(entry.time_ns, entry.old, entry.new, entry.op, entry.message, changed))
    return entries


def version_stack(repo: Repository, ref: str) -> list[SnapshotId]:
    """The versions `ref` went through, newest last, with rolled-back versions popped off.

    A pack or apply pushes its snapshot; a rollback pops back to its target. So rolling back one
    step twice goes back two versions instead of undoing the first rollback.
    """
    stack: list[SnapshotId] = []
    for entry in repo.store.reflog(ref):
        if entry.op == ROLLBACK and entry.new in stack:
            del stack[stack.index(entry.new) + 1 :]
        else:
            stack.append(entry.new)
    return stack

"""Patch bundles: ship a model update as only the chunks a store lacks, apply it, roll it back.

from pathlib import Path

from blockstore import patches
from blockstore.repo import Repository

with Repository.open("store") as repo:  # where tag v1 is the version the other store holds
    patches.diff(repo, "v1", "main", Path("update.bsp"))
with Repository.open("other-store") as other:
    patches.apply(other, Path("update.bsp"))  # main: v1 -> the new version
    patches.rollback(other)  # and back
"""

from .apply import DEFAULT_MAX_GROWTH, ApplyResult, apply
from .diff import DiffResult, diff
from .history import LogEntry, log
from .rollback import RollbackResult, rollback

__all__ = [
    "DEFAULT_MAX_GROWTH",
    "ApplyResult",
    "DiffResult",
    "LogEntry",
    "RollbackResult",
    "apply",
    "diff",
    "log",
    "rollback",
]

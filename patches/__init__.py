"""Patch bundles: ship a model update as only the chunks a store lacks, apply it, roll it back.

from blockstore import patches
patches.diff(repo, "v1", "v2", Path("update.bsp"))
patches.apply(other_repo, Path("update.bsp"))
patches.rollback(other_repo)
"""

from .apply import ApplyResult, apply
from .diff import DiffResult, diff
from .history import LogEntry, log
from .rollback import RollbackResult, rollback

__all__ = ["ApplyResult", "DiffResult", "LogEntry", "RollbackResult", "apply", "diff", "log", "rollback"]

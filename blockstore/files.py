"""Durable file-system steps and the words for the environment's refusals, shared by every writer
of files: export's atomic file and the LMDB store's atomic creation.

A rename is durable only once the directory holding it is synced, and a full disk or a read-only
mount must be told to the user as what it is (exit 8, `EnvironmentFailure`), never as damage.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

ENVIRONMENT_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}
"""The errnos that mean the machine refused (space, permissions, a read-only mount, the disk),
each in the words a message uses."""


def fsync_directory(directory: Path) -> None:
    """Make the entries of `directory` (a rename into it, a new file) survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

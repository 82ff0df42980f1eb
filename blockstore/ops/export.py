"""`export`: rebuild a snapshot's safetensors files byte for byte.

Each file is written to a temporary name beside its target, fsynced, and renamed over it, so a
crash or a damaged chunk never leaves a half-written file under the real name. Every chunk is
checked on the way out, against the strong digest a version 3 snapshot promises for it (else against
its key), and an older snapshot's every tensor against its digest. A killed export
cannot remove its temporary file, so each export first removes the ones dead exports left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from blockstore.core.manifests import Snapshot, SnapshotId, SourceFile
from blockstore.errors import EnvironmentFailure, InvalidArgument
from blockstore.files import ENVIRONMENT_CAUSES, fsync_directory
from blockstore.progress import Progress, Silent
from blockstore.repo import Repository
from blockstore.storage.base import process_alive, short_id

_PARTIAL_NAME = re.compile(r"\.(?P<target>.+)\.partial-(?P<pid>[1-9][0-9]{0,9})")
"""Exactly the temporary names `write_atomically` makes: `.NAME.partial-PID`."""
_MAX_PID = 2**31 - 1


@dataclass(frozen=True)
class ExportResult:
    snapshot_id: SnapshotId
    paths: tuple[Path, ...]
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    """What the user should be told, e.g. that a file-like target became a directory."""

    def to_json(self) -> dict[str, object]:
        return {
            "snapshot": self.snapshot_id.hex(),
            "paths": [str(path) for path in self.paths],
            "bytes": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }


def write_atomically(path: Path, blocks: Iterable[bytes | bytearray]) -> int:
    """Write an iterable of byte blocks to `path` via temp file + fsync + rename; returns bytes.
    The filesystem refusing (full, read-only, no permission) is an EnvironmentFailure naming
    `path`, with the partial file removed."""
    if not path.parent.is_dir():
        raise InvalidArgument(f"{path}: directory {path.parent} does not exist")
    temp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    written = 0
    try:
        with open(temp, "wb") as handle:
            _hold_lock(handle.fileno())
            for block in blocks:
                handle.write(block)
                written += len(block)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        fsync_directory(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        if exc.errno not in ENVIRONMENT_CAUSES:
            raise
        raise EnvironmentFailure(path, f"cannot write it: {ENVIRONMENT_CAUSES[exc.errno]}") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return written


def _hold_lock(handle: int) -> None:
    """Lock the temporary file while it is written, so a cleaner on another host that shares the
    directory (same PID, other machine) sees it is in use; the kernel drops the lock when the
    writer dies. A filesystem without locks only loses that cross-host guard."""
    with contextlib.suppress(OSError):
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_partials(directory: Path) -> list[Path]:
    """Remove the temporary files of exports that died in `directory`; returns what was removed.

    Only names of exactly export's own pattern are touched, and only when the PID in the name is
    not a live process on this host, the file is a regular file (not a link), and nobody holds its
    lock (an export on another host sharing the directory holds one while it writes)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    removed = []
    for entry in entries:
        found = _PARTIAL_NAME.fullmatch(entry.name)
        if not found:
            continue
        pid = int(found.group("pid"))
        if pid > _MAX_PID or pid == os.getpid() or process_alive(pid):
            continue
        if _unlink_if_unlocked(Path(entry.path)):
            removed.append(Path(entry.path))
    return removed


def _unlink_if_unlocked(path: Path) -> bool:
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        opened = os.fstat(handle)
        if not stat.S_ISREG(opened.st_mode):
            return False
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            return False  # replaced since it was opened: not the file judged stale
        path.unlink()
        return True
    except OSError:  # locked by a live writer, locks unsupported, or already gone
        return False
    finally:
        os.close(handle)


def _file_blocks(
    repo: Repository, snapshot_id: SnapshotId, snapshot: Snapshot, source: SourceFile, progress: Progress
) -> Iterator[bytes | bytearray]:
    """The bytes of one safetensors file in order: size prefix, verbatim header, tensor data."""
    yield struct.pack("<Q", len(source.header))
    yield source.header
    for name in source.tensors:
        for raw in repo.tensor_chunks(snapshot_id, snapshot.tensors[name]):
            progress.advance(len(raw), name)
            yield raw


def export(
    repo: Repository, snapshot_id: SnapshotId, out: Path, *, progress: Progress | None = None
) -> ExportResult:
    """Write the snapshot's files: to `out` itself for a one-file snapshot (its side files, such as
    config.json, are then left out, and a note says so), else into directory `out` with every
    side file."""
    started = time.perf_counter()
    progress = progress or Silent()
    snapshot = repo.snapshot(snapshot_id)
    progress.start("export", snapshot.nbytes)
    notes = []
    if len(snapshot.files) == 1 and not out.is_dir():
        targets = {snapshot.files[0]: out}
        extras: dict[str, bytes] = {}
        if snapshot.extras:
            notes.append(
                f"{out} is the weights file only; the {len(snapshot.extras)} side file(s) packed with it "
                f"({', '.join(sorted(snapshot.extras))}) are written by an export to a directory"
            )
    else:
        if out.suffix == ".safetensors" and not out.is_dir():
            notes.append(
                f"snapshot {short_id(snapshot_id)} holds {len(snapshot.files)} files, "
                f"so {out} is written as a directory holding them"
            )
        out.mkdir(parents=True, exist_ok=True)
        targets = {source: out / source.name for source in snapshot.files}
        extras = dict(snapshot.extras)
    for directory in {path.parent for path in targets.values()} | ({out} if extras else set()):
        remove_stale_partials(directory)
    written = 0
    for source, path in targets.items():
        written += write_atomically(path, _file_blocks(repo, snapshot_id, snapshot, source, progress))
    for name, blob in extras.items():
        written += write_atomically(out / name, [blob])
    paths = (*targets.values(), *(out / name for name in extras))
    return ExportResult(snapshot_id, paths, written, time.perf_counter() - started, notes)

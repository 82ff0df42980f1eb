"""`export`: rebuild a snapshot's safetensors files byte for byte.

Each file is written to a temporary name beside its target, fsynced, and renamed over it, so a
crash or a damaged chunk never leaves a half-written file under the real name. Every chunk is
checked against its key and every tensor against its digest on the way out.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from blockstore.core.manifests import Snapshot, SnapshotId, SourceFile
from blockstore.errors import InvalidArgument
from blockstore.progress import Progress, Silent
from blockstore.repo import Repository


@dataclass(frozen=True)
class ExportResult:
    snapshot_id: SnapshotId
    paths: tuple[Path, ...]
    bytes_written: int
    seconds: float

    def to_json(self) -> dict[str, object]:
        return {
            "snapshot": self.snapshot_id.hex(),
            "paths": [str(p) for p in self.paths],
            "bytes": self.bytes_written,
            "seconds": round(self.seconds, 3),
        }


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, blocks: Iterable[bytes | bytearray]) -> int:
    """Write an iterable of byte blocks to `path` via temp file + fsync + rename; returns bytes."""
    if not path.parent.is_dir():
        raise InvalidArgument(f"{path}: directory {path.parent} does not exist")
    temp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    written = 0
    try:
        with open(temp, "wb") as handle:
            for block in blocks:
                handle.write(block)
                written += len(block)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return written


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
    """Write the snapshot's files: to `out` itself for a one-file snapshot, else into directory `out`."""
    started = time.perf_counter()
    progress = progress or Silent()
    snapshot = repo.snapshot(snapshot_id)
    progress.start("export", snapshot.nbytes)
    if len(snapshot.files) == 1 and not out.is_dir():
        targets = {snapshot.files[0]: out}
        extras: dict[str, bytes] = {}
    else:
        out.mkdir(parents=True, exist_ok=True)
        targets = {source: out / source.name for source in snapshot.files}
        extras = dict(snapshot.extras)
    written = 0
    for source, path in targets.items():
        written += write_atomically(path, _file_blocks(repo, snapshot_id, snapshot, source, progress))
    for name, blob in extras.items():
        written += write_atomically(out / name, [blob])
    paths = (*targets.values(), *(out / name for name in extras))
    return ExportResult(snapshot_id, paths, written, time.perf_counter() - started)

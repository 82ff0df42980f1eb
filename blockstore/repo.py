"""The repository: a store plus the rules for naming, reading and publishing snapshots.

Everything above the raw LMDB store goes through here: resolving `main`, a tag or an id prefix to a
snapshot; loading a snapshot and checking it against its id; reading a tensor's chunks back with
every chunk and the whole tensor checked; publishing a snapshot (snapshot first, then the ref with
compare-and-set).
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from blockstore.core.chunks import DEFAULT_CHUNK_SIZE, check_chunk_size, decode_chunk
from blockstore.core.hashing import digest, new_digest
from blockstore.core.manifests import ManifestError, Snapshot, SnapshotId, TensorEntry
from blockstore.errors import (
    AmbiguousSnapshotId,
    ChunkCorrupt,
    ChunkMissing,
    InvalidArgument,
    RefNotFound,
    SnapshotNotFound,
    StoreCorrupt,
    TensorCorrupt,
)
from blockstore.storage import Location, Store, create_store, is_url, open_store  # also re-exported
from blockstore.storage.base import ReflogEntry, short_id

DEFAULT_REF = "main"
MIN_ID_PREFIX = 4
_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


def check_ref_name(name: str) -> str:
    """Ref names are short, printable and cannot be mistaken for an option or an id prefix."""
    if not _REF_NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(f"invalid ref name {name!r}: use letters, digits and . _ / - (max 200)")
    return name


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot as `ls` lists it: what it holds and which refs point at it."""

    id: SnapshotId
    parent: SnapshotId | None
    created_ns: int
    tensors: int
    raw_bytes: int
    message: str
    refs: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id.hex(),
            "parent": self.parent.hex() if self.parent else None,
            "created_ns": self.created_ns,
            "tensors": self.tensors,
            "raw_bytes": self.raw_bytes,
            "message": self.message,
            "refs": list(self.refs),
        }


@dataclass(frozen=True)
class StoreStats:
    """Store-wide counts (entries per kind, as the backend counts them) and sizes."""

    location: str
    counts: dict[str, int]
    """At least `refs`, `snapshots`, `chunks` and `file_bytes` (bytes the store occupies)."""
    chunk_bytes: int
    """Bytes of stored chunk values."""

    def to_json(self) -> dict[str, object]:
        return {**self.counts, "chunk_bytes": self.chunk_bytes, "store": self.location}


class Repository:
    """A blockstore opened for reading or writing."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def init(cls, location: Location, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Repository:
        """Create a store; its chunk size is kept so every later pack cuts tensors the same way
        (chunks cut differently never dedup)."""
        check_chunk_size(chunk_size)
        return cls(create_store(location, {"chunk_size": chunk_size}))

    @property
    def chunk_size(self) -> int:
        """The store's chunk size: what `pack` uses unless told otherwise."""
        return self.store.meta_int("chunk_size") or DEFAULT_CHUNK_SIZE

    @classmethod
    def open(cls, location: Location, *, readonly: bool = False, cache: Location | None = None) -> Repository:
        return cls(open_store(location, readonly=readonly, cache=cache))

    @classmethod
    def open_for_reading(cls, location: Location, *, cache: Location | None = None) -> Repository:
        """Open a store to read it over a long time (lazy runtime, export): writable when it can
        be, so the reader can pin its snapshot against gc; read-only (and unpinned) otherwise."""
        if is_url(location):
            return cls.open(location, cache=cache)
        path = Path(location)
        writable = os.access(path / "data.mdb", os.W_OK) and os.access(path, os.W_OK)
        return cls.open(path, readonly=not writable)

    @property
    def path(self) -> Location:
        return self.store.path

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def writer_lease(self) -> Iterator[None]:
        """Hold a lease for the span of a write that adds data before a ref points at it."""
        lease_id = self.store.acquire_lease()
        try:
            yield
        finally:
            self.store.release_lease(lease_id)

    def resolve(self, spec: str | None) -> SnapshotId:
        """A ref name, a full snapshot id or a unique id prefix → the snapshot id."""
        spec = spec or DEFAULT_REF
        target = self.store.get_ref(spec)
        if target is not None:
            return target
        if len(spec) >= MIN_ID_PREFIX and all(c in string.hexdigits for c in spec):
            matches = [sid for sid in self.store.snapshot_ids() if sid.hex().startswith(spec.lower())]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise AmbiguousSnapshotId(spec, len(matches), self.path)
        raise RefNotFound(spec, self.path)

    def refs(self) -> dict[str, SnapshotId]:
        """Every ref and the snapshot it points at."""
        return self.store.refs()

    def snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot in the store, oldest first, each checked against its id."""
        refs = self.refs()
        infos = []
        for snapshot_id in self.store.snapshot_ids():
            snapshot = self.snapshot(snapshot_id)
            infos.append(
                SnapshotInfo(
                    snapshot_id,
                    snapshot.parent,
                    snapshot.created_ns,
                    len(snapshot.tensors),
                    snapshot.nbytes,
                    snapshot.message,
                    tuple(sorted(name for name, target in refs.items() if target == snapshot_id)),
                )
            )
        return sorted(infos, key=lambda info: info.created_ns)

    def tag(self, name: str, target: str | None = DEFAULT_REF) -> SnapshotId:
        """Create ref `name` at the snapshot `target` names; refuses to move an existing ref
        (moving one is `rollback --to`, which the reflog records as such)."""
        snapshot_id = self.resolve(target)
        if self.store.get_ref(check_ref_name(name)) is not None:
            raise InvalidArgument(f"ref {name!r} already exists; use rollback --to to move it")
        self.store.move_ref(name, snapshot_id, None, "tag", f"tag {name}")
        return snapshot_id

    def log(self, ref: str = DEFAULT_REF) -> list[ReflogEntry]:
        """Every move of `ref`, oldest first; raises RefNotFound for a ref that does not exist."""
        if self.store.get_ref(ref) is None:
            raise RefNotFound(ref, self.path)
        return self.store.reflog(ref)

    def stats(self) -> StoreStats:
        """Entry counts and stored sizes (one pass over the chunk keys)."""
        counts = self.store.stat()
        stored = sum(self.store.stored_sizes(list(self.store.iter_keys())).values())
        return StoreStats(str(self.path), counts, stored)

    def pin(self, spec: str | None) -> tuple[SnapshotId, bytes | None]:
        """Resolve `spec` and pin that snapshot so gc keeps it while it is read: (id, lease id to
        `unpin`). A read-only store cannot record a pin (lease None): gc cannot see such a reader."""
        while True:
            snapshot_id = self.resolve(spec)
            if self.store.readonly:
                return snapshot_id, None
            try:
                return snapshot_id, self.store.acquire_lease(pin=snapshot_id)
            except SnapshotNotFound:
                if self.resolve(spec) == snapshot_id:  # really gone, not a ref moved on by a race
                    raise

    def unpin(self, lease_id: bytes | None) -> None:
        if lease_id is not None:
            self.store.release_lease(lease_id)

    @contextmanager
    def reading(self, spec: str | None) -> Iterator[SnapshotId]:
        """The snapshot `spec` names, pinned against gc for the span of the block."""
        snapshot_id, lease_id = self.pin(spec)
        try:
            yield snapshot_id
        finally:
            self.unpin(lease_id)

    def snapshot(self, snapshot_id: SnapshotId) -> Snapshot:
        """Load a snapshot and check that its bytes still hash to its id."""
        data = self.store.get_snapshot_bytes(snapshot_id)
        if data is None:
            raise SnapshotNotFound(snapshot_id.hex(), self.path)
        if digest(data) != snapshot_id:
            raise StoreCorrupt(self.path, f"snapshot {snapshot_id.hex()} does not hash to its id")
        try:
            return Snapshot.from_bytes(data)
        except ManifestError as exc:
            raise StoreCorrupt(self.path, f"snapshot {snapshot_id.hex()}: {exc}") from None

    def store_snapshot(self, snapshot: Snapshot) -> SnapshotId:
        """Write a snapshot (one transaction) without pointing any ref at it."""
        data = snapshot.to_bytes()
        snapshot_id = digest(data)
        self.store.put_snapshot(snapshot_id, data)
        return snapshot_id

    def publish(self, snapshot: Snapshot, ref: str, expected: SnapshotId | None, op: str) -> SnapshotId:
        """Write the snapshot, then move `ref` from `expected` to it (compare-and-set)."""
        snapshot_id = self.store_snapshot(snapshot)
        self.store.move_ref(check_ref_name(ref), snapshot_id, expected, op, snapshot.message)
        return snapshot_id

    def tensor_chunks(self, snapshot_id: SnapshotId, entry: TensorEntry) -> Iterator[bytearray]:
        """Decoded chunks of a tensor in order; each is checked against its key, the tensor
        against its digest once the last chunk is out. Damage raises TensorCorrupt naming both."""
        hasher = new_digest()
        values = self.store.get_many(chunk.key for chunk in entry.chunks)
        for chunk in entry.chunks:
            try:
                raw = decode_chunk(chunk.key, next(values), chunk.raw_len)
            except (ChunkCorrupt, ChunkMissing) as exc:
                raise TensorCorrupt(entry.name, short_id(snapshot_id), exc) from None
            hasher.update(raw)
            yield raw
        if hasher.digest() != entry.digest:
            raise TensorCorrupt(entry.name, short_id(snapshot_id), "bytes do not match the tensor digest")

"""The repository: a store plus the rules for naming, reading and publishing snapshots.

Everything above a store goes through here (nothing else calls a store's methods): resolving `main`,
a tag or an id prefix to a snapshot; loading a snapshot and checking it against its id; reading
chunks back, each decoded and checked against its key (and a whole tensor against its digest) by one
reader that export, verify, push/pull, apply and the lazy runtime share; writing chunks in bounded
batches; publishing a snapshot (snapshot first, then the ref with compare-and-set); and the leases,
pins and collection that gc and doctor work with.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from blockstore.codecs.nibbles import Difference
from blockstore.core.base_cache import BASES
from blockstore.core.chunks import (
    DEFAULT_CHUNK_SIZE,
    check_chunk_size,
    decode_base_onto,
    decode_chunk,
    decode_chunk_into,
    delta_base,
    delta_base_at_start,
    delta_header,
    delta_value,
)
from blockstore.core.hashing import ChunkKey, digest, new_digest, strong_digest
from blockstore.core.manifests import ChunkRef, ManifestError, Snapshot, SnapshotId, TensorEntry
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
from blockstore.storage.base import Fingerprint, Lease, ReflogEntry, short_id
from blockstore.storage.wrapper import StoreWrapper

DEFAULT_REF = "main"
MIN_ID_PREFIX = 4
_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


BATCH_BYTES = 64 << 20
"""Stored bytes a chunk write gathers before it commits: enough to amortize one LMDB transaction or
one round of parallel object-store PUTs, little enough to bound what a copy holds in memory."""

ENVELOPE_READ = 512
"""Bytes read from the start of a stored value to learn whether it is a delta (its envelope, a
few dozen bytes, fits; a longer one is read in a second request)."""

REROOT_LEVEL = 3
"""zstd level of a delta re-encoded against another base by a copy (`rooted_value`)."""

CHUNK_DAMAGE = (ChunkCorrupt, ChunkMissing)
"""What reading one chunk can find wrong with it: gone, or there but not decoding to its key."""


def tensor_damage(snapshot_id: SnapshotId, tensor: str, cause: object) -> TensorCorrupt:
    """The one error every reader raises for a damaged tensor: it names the tensor and the snapshot,
    and `cause` (a chunk's own error, naming its key) says what is wrong."""
    return TensorCorrupt(tensor, short_id(snapshot_id), cause)


def chunk_batches(
    items: Iterable[tuple[ChunkKey, bytes]], limit: int = BATCH_BYTES
) -> Iterator[list[tuple[ChunkKey, bytes]]]:
    """(key, stored value) pairs grouped into batches of about `limit` stored bytes (the last may be
    smaller; none is empty), so a long copy commits as it goes instead of holding everything."""
    batch: list[tuple[ChunkKey, bytes]] = []
    size = 0
    for key, value in items:
        batch.append((key, value))
        size += len(value)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


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
    delta_chunks: int = 0
    delta_bytes: int = 0
    """Chunks stored as deltas against a base chunk, and their stored bytes."""

    def to_json(self) -> dict[str, object]:
        return {
            **self.counts,
            "chunk_bytes": self.chunk_bytes,
            "delta_chunks": self.delta_chunks,
            "delta_bytes": self.delta_bytes,
            "store": self.location,
        }


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
        if 0 < len(spec) < MIN_ID_PREFIX and all(c in string.hexdigits for c in spec):
            # A short hex string was most likely meant as an id prefix: say why it was not one.
            hint = f"snapshot id prefixes need at least {MIN_ID_PREFIX} hex digits"
            raise RefNotFound(spec, f"{self.path} ({hint})")
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
        """Entry counts and stored sizes (one pass over the chunk keys; in a store marked as holding
        deltas, a second over the values' envelopes)."""
        counts = self.store.stat()
        sizes = self.store.stored_sizes(list(self.store.iter_keys()))
        deltas = self.delta_bases(sizes)
        delta_bytes = sum(sizes[key] for key in deltas)
        return StoreStats(str(self.path), counts, sum(sizes.values()), len(deltas), delta_bytes)

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
        data = self.snapshot_bytes(snapshot_id)
        try:
            return Snapshot.from_bytes(data)
        except ManifestError as exc:
            raise StoreCorrupt(self.path, f"snapshot {snapshot_id.hex()}: {exc}") from None

    def store_snapshot(self, snapshot: Snapshot) -> SnapshotId:
        """Write a snapshot (one transaction) without pointing any ref at it."""
        return self.store_snapshot_bytes(snapshot.to_bytes())

    def publish(self, snapshot: Snapshot, ref: str, expected: SnapshotId | None, op: str) -> SnapshotId:
        """Write the snapshot, then move `ref` from `expected` to it (compare-and-set)."""
        snapshot_id = self.store_snapshot(snapshot)
        self.move_ref(ref, snapshot_id, expected, op, snapshot.message)
        return snapshot_id

    def snapshot_bytes(self, snapshot_id: SnapshotId) -> bytes:
        """A snapshot's stored record, checked to hash to its id. A copy (push, pull, a bundle) ships
        these bytes as they are: re-encoding an older version's record would change its id."""
        data = self.store.get_snapshot_bytes(snapshot_id)
        if data is None:
            raise SnapshotNotFound(snapshot_id.hex(), self.path)
        if digest(data) != snapshot_id:
            raise StoreCorrupt(self.path, f"snapshot {snapshot_id.hex()} does not hash to its id")
        return data

    def store_snapshot_bytes(self, data: bytes) -> SnapshotId:
        """Write a snapshot record as it is (a copied or shipped one), under the id it hashes to,
        without pointing any ref at it; a record already there is left as it is."""
        snapshot_id = digest(data)
        self.store.put_snapshot(snapshot_id, data)
        return snapshot_id

    def has_snapshot(self, snapshot_id: SnapshotId) -> bool:
        """Whether the store holds the snapshot (unchecked: `snapshot` checks what it loads)."""
        return self.store.get_snapshot_bytes(snapshot_id) is not None

    def snapshot_ids(self) -> list[SnapshotId]:
        """Every snapshot id in the store, in key order (`snapshots()` sorts by age and checks)."""
        return self.store.snapshot_ids()

    # refs ----------------------------------------------------------------------------------------------

    def ref(self, name: str) -> SnapshotId | None:
        """The snapshot ref `name` points at, or None when there is no such ref. Unlike `resolve`,
        an id or a prefix is not accepted: callers that move a ref need its exact current target."""
        return self.store.get_ref(name)

    def move_ref(
        self, name: str, new: SnapshotId, expected: SnapshotId | None, op: str, message: str
    ) -> None:
        """Point ref `name` at `new` if it still points at `expected` (compare-and-set: a concurrent
        writer makes this raise RefConflict, never lose its move); the reflog records `op` and
        `message` in the same step. `new` must already be stored."""
        self.store.move_ref(check_ref_name(name), new, expected, op, message)

    # reading chunks: one decode-and-check path for every reader ---------------------------------------

    def read_chunk_into(self, chunk: ChunkRef, out: memoryview) -> int:
        """Decode `chunk` straight from the store into `out` (exactly its raw length) and check it
        against its strong digest when the snapshot gives one, else against its key; returns the
        stored value's length. On LMDB the value is a view of the memory
        map, so nothing is copied but the decoded bytes. Raises ChunkMissing or ChunkCorrupt."""

        def decode(value: bytes | memoryview) -> int:
            decode_chunk_into(chunk.key, value, out, chunk.strong, self.read_base_into)
            return len(value)

        return self.store.with_value(chunk.key, decode)

    def read_base(self, key: ChunkKey, raw_len: int) -> bytes | bytearray | memoryview:
        """What base chunk `key` decodes to, checked against its key (`read_base_into` a new buffer)."""
        decoded = self.read_base_into(key, memoryview(bytearray(raw_len)))
        assert decoded is not None  # (None only when given a difference)
        return decoded

    def read_base_into(
        self, key: ChunkKey, out: memoryview, difference: Difference | None = None, /
    ) -> bytes | bytearray | memoryview | None:
        """What base chunk `key` decodes to, checked against its key: how a delta chunk is read
        (FORMAT.md §1, a `BaseReader`). A base is never itself a delta, so this reads one value
        and no more. Decoded into `out` (returned) unless the base cache holds it; given the
        delta's `difference`, and with no base cache to fill, decoded with the difference added
        in one pass (None: `decode_base_onto`)."""
        place = (str(self.path), key)
        kept = BASES.get(place, len(out))
        if kept is not None:
            return kept
        if difference is not None and not BASES.limit:
            self.store.with_value(key, lambda value: decode_base_onto(key, value, out, difference))
            return None
        self.store.with_value(key, lambda value: decode_chunk_into(key, value, out))
        BASES.put(place, out)
        return out

    def rooted_value(self, key: ChunkKey, value: bytes, raw_len: int) -> bytes:
        """`value` as this store may take it: a delta whose base this store holds as a delta too
        (it was stored so here by another pack) would be a chain two deep, so it is re-encoded
        against that base's own base. Copies (apply, pull, push) pass every value through this;
        a base not in the store yet arrives in the same copy, whole, as the sender held it."""
        base = delta_base(value)
        if base is None or not self.store.deltas_allowed:  # (a store not marked holds no deltas)
            return value
        try:
            root = self.stored_delta_base(base)
        except ChunkMissing:
            return value
        if root is None:
            return value
        header = delta_header(value)
        assert header is not None
        raw = decode_chunk(
            key,
            value,
            raw_len,
            base=lambda base_key, out, *_: self.read_chunk(ChunkRef(base_key, len(out), 0)),
        )
        return delta_value(memoryview(raw), root, self.read_base(root, raw_len), header.width, REROOT_LEVEL)

    def delta_root(self, chunk: ChunkRef) -> tuple[ChunkKey, bytes | bytearray | memoryview]:
        """(key, decoded bytes) of the chunk a new delta against `chunk` is taken against: `chunk`
        itself, or its base when it is stored as a delta (so chains stay one deep)."""

        def root(value: bytes | memoryview) -> tuple[ChunkKey, bytes | bytearray | memoryview]:
            base = delta_base(value)
            if base is None:
                return chunk.key, decode_chunk(chunk.key, value, chunk.raw_len, chunk.strong)
            return base, self.read_base(base, chunk.raw_len)

        return self.store.with_value(chunk.key, root)

    def stored_delta_base(self, key: ChunkKey) -> ChunkKey | None:
        """The base chunk `key` is stored as a delta against, or None, from the start of its value
        only (an envelope is a few dozen bytes; on an object store, one small range request).
        Raises ChunkMissing."""
        start = self.store.value_start(key, ENVELOPE_READ)

        def read(length: int) -> bytes:
            if length <= len(start) or len(start) < ENVELOPE_READ:  # (a shorter value is all here)
                return start[:length]
            return self.store.value_start(key, length)

        return delta_base_at_start(read)

    def delta_bases(self, keys: Iterable[ChunkKey]) -> dict[ChunkKey, ChunkKey]:
        """The base of each of `keys` that the store holds as a delta chunk (others are left out).
        Reads each stored value's envelope (on an object store, one small range request per key),
        unless the store is not marked as holding deltas. A value too damaged to say is left out
        too (verify reports it)."""
        if not self.store.deltas_allowed:
            return {}

        def base_of(key: ChunkKey) -> ChunkKey | None:
            try:
                return self.stored_delta_base(key)
            except CHUNK_DAMAGE:
                return None

        keys = list(keys)
        bases = self.store.map_ordered(base_of, keys)
        return {key: base for key, base in zip(keys, bases, strict=True) if base is not None}

    def read_chunk(self, chunk: ChunkRef) -> bytearray:
        """`chunk` decoded into a new buffer and checked against its key (see `read_chunk_into`)."""
        out = bytearray(chunk.raw_len)
        self.read_chunk_into(chunk, memoryview(out))
        return out

    def decode_chunk_into(
        self, snapshot_id: SnapshotId, entry: TensorEntry, index: int, out: memoryview
    ) -> int:
        """Chunk `index` of tensor `entry` decoded into `out` and checked; returns the stored length.
        The lazy runtime's hot path: its decode threads call this, each into its own slice of one
        preallocated tensor buffer, with no copy of the stored value. Damage raises TensorCorrupt
        naming the tensor, the snapshot and the chunk."""
        try:
            return self.read_chunk_into(entry.chunks[index], out)
        except CHUNK_DAMAGE as exc:
            raise tensor_damage(snapshot_id, entry.name, exc) from None

    def checked_chunks(self, chunks: Sequence[ChunkRef]) -> Iterator[bytearray | ChunkCorrupt | ChunkMissing]:
        """Each of `chunks` decoded and checked against its key, in order, fetched and decoded ahead
        on the store's threads (an object store's round trips overlap; a local map is read in turn,
        which is as fast as it gets there). A damaged chunk comes back as its error instead of
        raising, so a checker (`verify`) can go on and report the rest."""

        def one(chunk: ChunkRef) -> bytearray | ChunkCorrupt | ChunkMissing:
            try:
                return self.read_chunk(chunk)
            except CHUNK_DAMAGE as exc:
                return exc

        return self.store.map_ordered(one, chunks)

    def tensor_chunks(self, snapshot_id: SnapshotId, entry: TensorEntry) -> Iterator[bytearray]:
        """Decoded chunks of a tensor in order, each checked as it comes out. A chunk-list digest
        (version 3) was checked against the chunk list when the snapshot was read, and each chunk
        against its strong digest, which settles the tensor; an older tensor's bytes are checked
        against its digest once the last chunk is out. Damage raises TensorCorrupt naming both."""
        hasher = None if entry.merkle else new_digest()
        for raw in self.checked_chunks(entry.chunks):
            if isinstance(raw, CHUNK_DAMAGE):
                raise tensor_damage(snapshot_id, entry.name, raw) from None
            if hasher is not None:
                hasher.update(raw)
            yield raw
        if hasher is not None and hasher.digest() != entry.digest:
            raise tensor_damage(snapshot_id, entry.name, "bytes do not match the tensor digest")

    def checked_values(
        self, snapshot_id: SnapshotId, chunks: Iterable[tuple[TensorEntry, ChunkRef]]
    ) -> Iterator[tuple[ChunkKey, bytes]]:
        """(key, stored value) of each (owning tensor, chunk), in order, fetched ahead on the store's
        threads. Each value is decoded once to check it against its key and the decoded bytes are
        dropped: a copy ships stored values, and must never spread a damaged chunk to another store.
        Damage raises TensorCorrupt naming the tensor that owns the chunk."""

        def one(item: tuple[TensorEntry, ChunkRef]) -> tuple[ChunkKey, bytes]:
            entry, chunk = item
            try:
                value = self.store.get(chunk.key)
                decode_chunk(chunk.key, value, chunk.raw_len, chunk.strong, self.read_base_into)
            except CHUNK_DAMAGE as exc:
                raise tensor_damage(snapshot_id, entry.name, exc) from None
            return chunk.key, value

        return self.store.map_ordered(one, chunks)

    def stored_digests(self, vouching: Iterable[Snapshot] = ()) -> StoredDigests:
        """What the chunks this store holds decode to, by strong digest (see `StoredDigests`);
        `vouching` adds snapshots of this store the caller has loaded to those at the refs."""
        return StoredDigests(self, vouching)

    def stored_values(self, keys: Iterable[ChunkKey]) -> Iterator[bytes]:
        """Stored values of `keys` in order, NOT decoded or checked: for writing them elsewhere when
        the receiver checks every chunk itself (`apply` decodes all of a bundle before it writes),
        and for measuring a codec apart from the store. Raises ChunkMissing for an absent key."""
        return self.store.get_many(keys)

    # chunk presence and writes ---------------------------------------------------------------------------

    def has_chunks(self, keys: Iterable[ChunkKey]) -> set[ChunkKey]:
        """Which of `keys` the store holds (no value is read): what a copy can skip, or what a
        quick `verify` finds missing."""
        return self.store.contains(keys)

    def stored_sizes(self, keys: Iterable[ChunkKey]) -> dict[ChunkKey, int]:
        """Stored length of each of `keys` the store holds (absent keys are left out)."""
        return self.store.stored_sizes(keys)

    def chunk_keys(self) -> Iterator[ChunkKey]:
        """Every chunk key in the store, referenced or not (for orphans and gc)."""
        return self.store.iter_keys()

    def put_chunks(self, items: Iterable[tuple[ChunkKey, bytes]], limit: int = BATCH_BYTES) -> int:
        """Add the chunks the store lacks, committed in batches of about `limit` stored bytes;
        returns the bytes newly written. Call it under `writer_lease`: until a snapshot references
        them, the new chunks look like garbage to gc. Before the first delta chunk goes in, the
        store marks itself as holding them (format /3, `Store.put_batch`), so an older reader
        refuses it by its format instead of calling the deltas damage."""
        return sum(self.store.put_batch(batch) for batch in chunk_batches(items, limit))

    # leases, pins, collection and health ---------------------------------------------------------------

    def leases(self) -> list[Lease]:
        """Every lease recorded, live or stale: writers that block gc and readers that pin a
        snapshot (stale ones are of processes that are gone; the next gc removes them)."""
        return self.store.leases()

    def pinned_snapshots(self) -> set[SnapshotId]:
        """Snapshots live readers have pinned: roots for gc, like refs."""
        return self.store.pinned_snapshots()

    def roots_fingerprint(self) -> Fingerprint:
        """A value that changes whenever a ref moves or the reflog grows: gc takes one before it
        plans and hands it to `collect`, which deletes nothing if the roots changed meanwhile."""
        return self.store.roots_fingerprint()

    def collect(
        self, snapshot_ids: list[SnapshotId], chunk_keys: list[ChunkKey], fingerprint: Fingerprint
    ) -> None:
        """Delete unreachable snapshots and chunks as one step, unless a writer holds a lease, a
        reader pinned a doomed snapshot, or the roots changed since `fingerprint` (those raise
        WriterActive and delete nothing); stale leases go in the same step."""
        self.store.collect(snapshot_ids, chunk_keys, fingerprint)

    def usage(self) -> dict[str, int]:
        """How full the store is, for `doctor`: `file_bytes` always; for LMDB also `map_size`,
        `map_used`, `reader_slots` and `max_readers`."""
        return self.store.usage()

    def request_counts(self) -> dict[str, int]:
        """Requests sent per verb (GET, PUT, ...) by an object store, through its cache if it has
        one; empty for a local store. For benchmarks that report what a load cost on the wire."""
        store = self.store
        while not hasattr(store, "requests") and isinstance(store, StoreWrapper):
            store = store.inner  # (the read-through cache and other wrappers count nothing)
        return dict(getattr(store, "requests", {}))


class StoredDigests:
    """The strong (BLAKE3) digest of the bytes a stored chunk decodes to, for a writer about to
    reference that chunk by key (pack deduplicating, apply and pull taking in a snapshot): keys are
    xxh3 and can collide, so a writer must know the stored chunk is the one it means.

    Every writer of a version 3 snapshot makes sure each chunk it references is stored with the
    bytes the snapshot promises (pack computes or compares them, apply and pull check what they
    receive and what they reuse through this class). So the version 3 snapshots the refs hold vouch
    for their chunks, and a re-pack of a model learns the digest of every chunk it shares with the
    version it replaces without decoding one. A chunk no such snapshot vouches for (stored by an
    older pack, or reached only from history) is decoded once, checked against its key, and hashed.
    """

    def __init__(self, repo: Repository, vouching: Iterable[Snapshot] = ()) -> None:
        self._repo = repo
        self._vouching = list(vouching)
        self._known: dict[ChunkKey, bytes] | None = None

    def _snapshots(self) -> Iterator[Snapshot]:
        yield from self._vouching
        for snapshot_id in set(self._repo.refs().values()):
            try:
                yield self._repo.snapshot(snapshot_id)
            except (StoreCorrupt, SnapshotNotFound):  # verify's to report; decode instead
                continue

    def _vouched(self) -> dict[ChunkKey, bytes]:
        known: dict[ChunkKey, bytes] = {}
        disputed: set[ChunkKey] = set()
        for snapshot in self._snapshots():
            for entry in snapshot.tensors.values():
                for chunk in entry.chunks:
                    if chunk.strong is not None and known.setdefault(chunk.key, chunk.strong) != chunk.strong:
                        disputed.add(chunk.key)
        for key in disputed:  # two snapshots promise different bytes: only the chunk itself can say
            del known[key]
        return known

    def of(self, key: ChunkKey, raw_len: int) -> bytes:
        """The strong digest of stored chunk `key` (which must be present). Raises ChunkCorrupt or
        ChunkMissing when it has to be decoded and cannot be."""
        if self._known is None:
            self._known = self._vouched()
        found = self._known.get(key)
        if found is None:
            found = strong_digest(self._repo.read_chunk(ChunkRef(key, raw_len, 0)))
            self._known[key] = found
        return found

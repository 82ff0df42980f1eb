"""The store on an S3-compatible object store: many hosts, one store (docs/design.md §10, FORMAT.md §5).

Layout under `s3://bucket/prefix/`: create-only `meta/<name>`, `chunks/<key hex>` and
`snapshots/<id hex>` (a create that finds the object there just means "already there"); one mutable
`refs/<name>` per ref, body msgpack `[generation, reflog entry]`, replaced only with If-Match on its
ETag (compare-and-set; the generation makes equal bodies impossible, so an A→B→A change cannot fool
the ETag); append-only, create-only `reflog/<name>/<generation>`; `leases/<id>` like LMDB's leases;
`locks/gc` while a gc deletes. Writes go chunks → snapshot → ref, as on LMDB.

Object stores have no multi-object transactions, so two LMDB guarantees are rebuilt from ordering:
- a ref move writes the ref (CAS) and then its reflog entry; the ref body carries the entry, so a
  crash between the two is healed by the next move (and `reflog` shows the entry meanwhile);
- gc takes `locks/gc` (create-only), refuses while a live writer holds a lease (writers that start
  later see the lock and back off), deletes snapshots, re-reads the leases and deletes chunks only
  if no reader pinned a deleted snapshot meanwhile (a reader pins, *then* checks the snapshot).

On open the store is probed: a second create-only put and a stale If-Match put must both fail. Some
S3 proxies silently ignore those headers; on such a server ref moves are refused with a clear error.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlparse

import msgpack
import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)

from blockstore.core.hashing import ChunkKey
from blockstore.errors import (
    BlockstoreError,
    ChunkMissing,
    ConditionalWritesIgnored,
    InvalidArgument,
    ObjectStoreDenied,
    ObjectStoreFailed,
    ObjectStoreNotConfigured,
    RefConflict,
    SnapshotNotFound,
    StoreCorrupt,
    StoreExists,
    StoreFormatMismatch,
    StoreNotFound,
    WriterActive,
)
from blockstore.storage.base import (
    Capabilities,
    Fingerprint,
    Lease,
    ReflogEntry,
    StoreBase,
    blocking_leases,
    process_alive,
    short_id,
)
from blockstore.storage.faults import crash_point

OBJECT_FORMAT = "blockstore-s3/2"
DELTA_OBJECT_FORMAT = "blockstore-s3/3"
READABLE_OBJECT_FORMATS = ("blockstore-s3/1", OBJECT_FORMAT, DELTA_OBJECT_FORMAT)
"""As the LMDB store's formats: /2 may hold framed chunk values, /3 delta chunks too. A /1 store is
marked /2 before its first chunk write (a /2 mark over /1 chunks only is still a valid /2 store),
and any store /3 before its first delta chunk (`allow_deltas`)."""
DEFAULT_CONCURRENCY = 8
CONCURRENCY_ENV = "BLOCKSTORE_S3_CONCURRENCY"
_GENERATION_DIGITS = 20
_CONFLICT_RETRIES = 5
_NOT_FOUND = (NotFoundError, FileNotFoundError)  # obstore raises the builtin for a missing object
_T = TypeVar("_T")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
"""Where obstore finds credentials before it falls back to the EC2 instance-metadata service."""
_METADATA_SIGNS = ("169.254.169.254", "/latest/api/token", "instance metadata", "credential")


def _endpoint(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _failure(url: str, verb: str, key: str, exc: BaseException, *, endpoint_known: bool) -> BlockstoreError:
    """One line for a failed request. Without credentials in the environment obstore asks the EC2
    instance-metadata service for them, and its error says only that this failed: say instead
    what to set. Without an endpoint the request went to AWS S3; say so (a forgotten endpoint for
    MinIO or SeaweedFS otherwise reads as a credentials or network error)."""
    detail = _first_line(exc)
    no_credentials = not any(os.environ.get(name) for name in _CREDENTIAL_ENV)
    if no_credentials and any(sign in detail.lower() for sign in _METADATA_SIGNS):
        return ObjectStoreNotConfigured(
            url,
            "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            + ("" if endpoint_known else " (and AWS_ENDPOINT_URL for a server other than AWS S3)"),
        )
    if not endpoint_known:
        detail += " (no AWS_ENDPOINT_URL is set, so this went to AWS S3)"
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
        return ObjectStoreDenied(url, verb, key, detail)
    return ObjectStoreFailed(url, verb, key, detail)


def _s3_client(url: str, endpoint_url: str | None) -> obstore.store.S3Store:
    parsed = urlparse(url)
    if not parsed.netloc:
        raise InvalidArgument(f"{url}: an object store URL is s3://BUCKET[/PREFIX]")
    endpoint = _endpoint(endpoint_url)
    options: dict[str, Any] = {}
    if endpoint:
        options["endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["client_options"] = {"allow_http": True}
    # Credentials and region come from the usual AWS environment variables (obstore reads them).
    try:
        return obstore.store.S3Store(parsed.netloc, prefix=parsed.path.strip("/") or None, **options)
    except BaseError as exc:  # half-set credentials (a key id without its secret), say
        raise ObjectStoreNotConfigured(
            url,
            f"{_first_line(exc).removeprefix('Generic S3 error: ')}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY"
            + ("" if endpoint else " (and AWS_ENDPOINT_URL for a server other than AWS S3)"),
        ) from None


class ObjectStore(StoreBase):
    """A blockstore on an S3-compatible bucket/prefix; the same contract as `LmdbStore`."""

    def __init__(
        self,
        url: str,
        *,
        readonly: bool = False,
        endpoint_url: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        client: Any = None,
    ) -> None:
        self.path = url
        self.readonly = readonly
        self.client = client if client is not None else _s3_client(url, endpoint_url)
        self._endpoint_known = client is not None or _endpoint(endpoint_url) is not None
        self.requests: dict[str, int] = {"GET": 0, "PUT": 0, "HEAD": 0, "DELETE": 0, "LIST": 0}
        self._count_lock = threading.Lock()
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(concurrency, "blockstore-s3")
        found = self._get_or_none("meta/format")
        if found is None:
            raise StoreNotFound(url, url)
        self._format = bytes(found).decode(errors="replace")
        if self._format not in READABLE_OBJECT_FORMATS:
            raise StoreFormatMismatch(url, self._format, " or ".join(READABLE_OBJECT_FORMATS))
        self.conditional_writes = True
        if not readonly:
            try:
                self.conditional_writes = self._probe()
            except ObjectStoreDenied:  # read-only credentials (typical for inference hosts): read,
                self.readonly = True  # unpinned; writes would be refused by the server anyway

    @classmethod
    def create(
        cls,
        url: str,
        params: dict[str, int] | None = None,
        *,
        endpoint_url: str | None = None,
        client: Any = None,
    ) -> ObjectStore:
        """Create an empty store at `url` with creation `params`; refuses a prefix that has one."""
        client_given = client is not None
        client = client if client is not None else _s3_client(url, endpoint_url)
        try:
            try:  # refuse before writing anything: an existing store's parameters must not change
                obstore.head(client, "meta/format")
                raise StoreExists(url)
            except _NOT_FOUND:
                pass
            for name, value in {**(params or {}), "created_ns": time.time_ns()}.items():
                obstore.put(client, f"meta/{name}", str(value).encode())
            obstore.put(client, "meta/format", OBJECT_FORMAT.encode(), mode="create")  # last: it exists now
        except AlreadyExistsError:
            raise StoreExists(url) from None
        except BaseError as exc:
            known = client_given or _endpoint(endpoint_url) is not None
            raise _failure(url, "PUT", "meta/", exc, endpoint_known=known) from None
        return cls(url, endpoint_url=endpoint_url, client=client)

    # object primitives (counted, so tests and benchmarks can see what went over the wire) ---------

    def _call(self, verb: str, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """One request, counted; failures other than the ones callers handle become one line."""
        with self._count_lock:
            self.requests[verb] += 1
        try:
            return function(self.client, *args, **kwargs)
        except (*_NOT_FOUND, AlreadyExistsError, PreconditionError):
            raise
        except BaseError as exc:
            key = args[0] if args else ""
            raise _failure(self.path, verb, key, exc, endpoint_known=self._endpoint_known) from None

    def _get_or_none(self, key: str) -> bytes | None:
        found = self._get_with_etag(key)
        return found[0] if found else None

    def _get_with_etag(self, key: str) -> tuple[bytes, str | None] | None:
        """The object and its ETag (None from a backend that sends none), or None if absent."""
        try:
            result = self._call("GET", obstore.get, key)
            return bytes(result.bytes()), result.meta["e_tag"]
        except _NOT_FOUND:
            return None

    def _put(self, key: str, data: bytes, *, mode: Any) -> str | None:
        return self._call("PUT", obstore.put, key, data, mode=mode)["e_tag"]

    def _create(self, key: str, data: bytes) -> bool:
        """Create-only put; False when the object was already there (same key: same content)."""
        try:
            self._put(key, data, mode="create")
        except AlreadyExistsError:
            return False
        return True

    def _size(self, key: str) -> int | None:
        try:
            return int(self._call("HEAD", obstore.head, key)["size"])
        except _NOT_FOUND:
            return None

    def _exists(self, key: str) -> bool:
        return self._size(key) is not None

    def _delete(self, key: str) -> None:
        self._call("DELETE", obstore.delete, key)

    def _list(self, prefix: str) -> list[tuple[str, int]]:
        """(key relative to the store, size) of every object under `prefix`."""
        pages = self._call("LIST", lambda client: list(obstore.list(client, prefix=prefix)))
        return [(meta["path"], int(meta["size"])) for page in pages for meta in page]

    def _ids(self, prefix: str) -> list[bytes]:
        """The keys or ids named in hex by the objects under `prefix`."""
        return [bytes.fromhex(path.rsplit("/", 1)[1]) for path, _ in self._list(prefix)]

    def _parallel(self, function: Callable[[Any], _T], items: Iterable[Any]) -> list[_T]:
        return list(self._pool.map(function, items))

    def _probe(self) -> bool:
        """True when the server honours create-only puts and If-Match (see the module docstring)."""
        key = f"probe/{uuid.uuid4().hex}"
        first = self._put(key, b"first", mode="create")
        try:
            try:
                self._put(key, b"second", mode="create")
                return False
            except AlreadyExistsError:
                pass
            self._put(key, b"third", mode="overwrite")
            try:
                self._put(key, b"fourth", mode={"e_tag": first})
                return False
            except PreconditionError:
                return True
        finally:
            self._delete(key)

    def _require_conditional_writes(self) -> None:
        if not self.conditional_writes:
            raise ConditionalWritesIgnored(self.path)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            zero_copy_values=False,
            memory_map=False,
            conditional_writes=self.conditional_writes,
            concurrency=self.concurrency,
        )

    def meta_int(self, name: str) -> int | None:
        value = self._get_or_none(f"meta/{name}")
        return int(value) if value is not None else None

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # chunks ------------------------------------------------------------------------------------------

    def get(self, key: ChunkKey) -> bytes:
        value = self._get_or_none(f"chunks/{key.hex()}")
        if value is None:
            raise ChunkMissing(key.hex())
        return value

    def with_value(self, key: ChunkKey, use: Callable[[bytes | memoryview], _T]) -> _T:
        """`use(value)` with the response body itself (a read-only buffer, kept alive by whoever
        holds it): a copy of every GET into `bytes` cost a sixth of a cached cold load's time."""
        try:
            body = self._call("GET", obstore.get, f"chunks/{key.hex()}").bytes()
        except _NOT_FOUND:
            raise ChunkMissing(key.hex()) from None
        return use(memoryview(body))

    def value_start(self, key: ChunkKey, length: int) -> bytes:
        """One range request (a server returns all of a shorter object)."""
        try:
            return bytes(self._call("GET", obstore.get_range, f"chunks/{key.hex()}", start=0, length=length))
        except _NOT_FOUND:
            raise ChunkMissing(key.hex()) from None

    def map_ordered(self, function: Callable[[Any], _T], items: Iterable[Any]) -> Iterator[_T]:
        """`function` over `items` on this store's threads, results in order, at most `concurrency`
        in flight (so a long tensor is never held in memory whole, unlike `pool.map`). `get_many`
        goes through here: export, verify and push, which read a tensor front to back, would
        otherwise wait out every round trip."""
        pending: deque[Future[_T]] = deque()
        for item in items:
            pending.append(self._pool.submit(function, item))
            if len(pending) >= self.concurrency:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def stored_sizes(self, keys: Iterable[ChunkKey]) -> dict[ChunkKey, int]:
        keys = list(dict.fromkeys(keys))
        sizes = self._parallel(lambda key: self._size(f"chunks/{key.hex()}"), keys)
        return {key: size for key, size in zip(keys, sizes, strict=True) if size is not None}

    @property
    def deltas_allowed(self) -> bool:
        """Marked format /3: the store may hold delta chunks (see `allow_deltas`). Read afresh
        (one GET) until it is seen set, which it never stops being: another host may have written
        the first delta since this one opened, and gc must not miss the bases that delta needs."""
        if self._format != DELTA_OBJECT_FORMAT:
            found = self._get_or_none("meta/format")
            if found is not None and bytes(found).decode(errors="replace") == DELTA_OBJECT_FORMAT:
                self._format = DELTA_OBJECT_FORMAT
        return self._format == DELTA_OBJECT_FORMAT

    def allow_deltas(self) -> None:
        if self._format != DELTA_OBJECT_FORMAT:
            self._call("PUT", obstore.put, "meta/format", DELTA_OBJECT_FORMAT.encode())
            self._format = DELTA_OBJECT_FORMAT

    def put_batch(self, items: Iterable[tuple[ChunkKey, bytes]]) -> int:
        """Create chunks that are not there yet, in parallel; returns bytes newly written. A batch
        that brings a delta chunk marks the store /3 first (`allow_deltas`)."""
        pending = list(items)
        self._allow_deltas_for(value for _, value in pending)
        if self._format == READABLE_OBJECT_FORMATS[0]:
            found = self._get_or_none("meta/format")  # another host may have marked it since: never lower
            if found is None or bytes(found).decode(errors="replace") == READABLE_OBJECT_FORMATS[0]:
                self._call("PUT", obstore.put, "meta/format", OBJECT_FORMAT.encode())
                self._format = OBJECT_FORMAT
            else:
                self._format = bytes(found).decode(errors="replace")
        crash_point("chunks.before-commit")
        written = self._parallel(
            lambda item: len(item[1]) if self._create(f"chunks/{item[0].hex()}", item[1]) else 0, pending
        )
        crash_point("chunks.committed")
        return sum(written)

    def delete_batch(self, keys: Iterable[ChunkKey]) -> int:
        present = self.contains(keys)
        self._parallel(lambda key: self._delete(f"chunks/{key.hex()}"), present)
        return len(present)

    def iter_keys(self) -> Iterator[ChunkKey]:
        return iter(self._ids("chunks/"))

    # snapshots ---------------------------------------------------------------------------------------

    def get_snapshot_bytes(self, snapshot_id: bytes) -> bytes | None:
        return self._get_or_none(f"snapshots/{snapshot_id.hex()}")

    def put_snapshot(self, snapshot_id: bytes, data: bytes) -> None:
        crash_point("snapshot.before-commit")
        self._create(f"snapshots/{snapshot_id.hex()}", data)
        crash_point("snapshot.committed")

    def snapshot_ids(self) -> list[bytes]:
        return sorted(self._ids("snapshots/"))

    # refs and reflog ---------------------------------------------------------------------------------

    def _read_ref(self, name: str) -> tuple[int, ReflogEntry, str | None] | None:
        """(generation, the entry of its last move, ETag) of a ref, or None if it does not exist."""
        found = self._get_with_etag(f"refs/{name}")
        if found is None:
            return None
        try:
            generation, entry = msgpack.unpackb(found[0], raw=False)
            return int(generation), ReflogEntry.from_bytes(entry), found[1]
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise StoreCorrupt(self.path, f"ref {name!r} is malformed ({exc})") from None

    def _read_refs(self) -> dict[str, tuple[int, ReflogEntry, str | None]]:
        names = [path[len("refs/") :] for path, _ in self._list("refs/")]
        reads = self._parallel(self._read_ref, names)
        return {name: read for name, read in zip(names, reads, strict=True) if read is not None}

    def refs(self) -> dict[str, bytes]:
        return {name: read[1].new for name, read in self._read_refs().items()}

    def get_ref(self, name: str) -> bytes | None:
        read = self._read_ref(name)
        return read[1].new if read else None

    def _reflog_key(self, name: str, generation: int) -> str:
        return f"reflog/{name}/{generation:0{_GENERATION_DIGITS}d}"

    def move_ref(self, name: str, new: bytes, expected: bytes | None, op: str, message: str) -> None:
        """Point `name` at `new` if it still points at `expected` (If-Match on the ref's ETag), then
        log the move; a 409 ConditionalRequestConflict is retried, a lost race is RefConflict."""
        self._require_conditional_writes()
        if not self._exists(f"snapshots/{new.hex()}"):
            raise StoreCorrupt(self.path, f"refusing to point ref {name!r} at absent snapshot {new.hex()}")
        for _ in range(_CONFLICT_RETRIES):
            current = self._read_ref(name)
            found = current[1].new if current else None
            if found != expected:
                raise RefConflict(name, short_id(expected), short_id(found))
            generation = current[0] + 1 if current else 1
            if current:  # heal a crash between a previous move and its reflog entry
                self._create(self._reflog_key(name, current[0]), current[1].to_bytes())
            entry = ReflogEntry(time.time_ns(), expected, new, op, message)
            body = msgpack.packb([generation, entry.to_bytes()], use_bin_type=True)
            crash_point("ref.before-commit")
            try:
                self._put(f"refs/{name}", body, mode={"e_tag": current[2]} if current else "create")
            except (AlreadyExistsError, PreconditionError):
                raise RefConflict(name, short_id(expected), short_id(self.get_ref(name))) from None
            except ObjectStoreFailed as exc:
                if "409" in str(exc) or "ConditionalRequestConflict" in str(exc):
                    continue  # S3 asks to retry a conditional write that raced another
                raise
            crash_point("ref.committed")
            self._create(self._reflog_key(name, generation), entry.to_bytes())
            return
        raise RefConflict(name, short_id(expected), "(still contended after retries)")

    def reflog(self, name: str) -> list[ReflogEntry]:
        prefix = f"reflog/{name}/"
        paths = sorted(path for path, _ in self._list(prefix) if "/" not in path[len(prefix) :])
        entries = [ReflogEntry.from_bytes(data) for data in self._parallel(self._get_or_none, paths) if data]
        current = self._read_ref(name)
        if current and self._reflog_key(name, current[0]) not in paths:
            entries.append(current[1])  # the last move's entry, not yet logged (a crash in between)
        return entries

    # leases and garbage collection -------------------------------------------------------------------

    def acquire_lease(self, pin: bytes | None = None) -> bytes:
        """A writer lease (backs off while a gc holds its lock) or a reader's pin on `pin`, which
        is checked to still exist *after* the lease is visible (gc re-reads leases before deleting
        chunks, so a pin that sees its snapshot keeps its chunks)."""
        lease_id = os.urandom(8)
        key = f"leases/{lease_id.hex()}"
        crash_point("lease.before-commit")
        self._put(key, Lease.record(pin), mode="create")
        crash_point("lease.committed")
        if pin is not None and not self._exists(f"snapshots/{pin.hex()}"):
            self._delete(key)
            raise SnapshotNotFound(pin.hex(), self.path)
        if pin is None and self._live_gc_lock():
            self._delete(key)
            raise WriterActive(self.path, "a gc is deleting; run the write again when it is done")
        return lease_id

    def release_lease(self, lease_id: bytes) -> None:
        crash_point("unlease.before-commit")
        self._delete(f"leases/{lease_id.hex()}")
        crash_point("unlease.committed")

    def leases(self) -> list[Lease]:
        paths = [path for path, _ in self._list("leases/")]
        records = self._parallel(self._get_or_none, paths)
        return [
            Lease.from_record(bytes.fromhex(path.rsplit("/", 1)[1]), record)
            for path, record in zip(paths, records, strict=True)
            if record is not None  # released between the listing and the read
        ]

    def roots_fingerprint(self) -> Fingerprint:
        """Refs and the reflog's length, which is the sum of the refs' generations (one entry per
        move; `reflog` supplies a last entry a crash left unwritten), so no reflog is read."""
        reads = self._read_refs()
        return {name: read[1].new for name, read in reads.items()}, sum(read[0] for read in reads.values())

    def _live_gc_lock(self) -> bool:
        record = self._get_or_none("locks/gc")
        if record is None:
            return False
        pid, host, _ = msgpack.unpackb(record, raw=False)
        return host != socket.gethostname() or process_alive(pid)

    def collect(
        self, snapshot_ids: list[bytes], chunk_keys: list[ChunkKey], fingerprint: Fingerprint
    ) -> None:
        """Delete unreachable snapshots, then chunks, under `locks/gc` (see the module docstring)."""
        self._require_conditional_writes()
        lock = msgpack.packb([os.getpid(), socket.gethostname(), time.time_ns()])
        if not self._create("locks/gc", lock):
            if self._live_gc_lock():
                raise WriterActive(self.path, "another gc is running")
            self._delete("locks/gc")  # left by a gc that died on this host
            if not self._create("locks/gc", lock):
                raise WriterActive(self.path, "another gc is running")
        try:
            doomed = set(snapshot_ids)
            self._check_no_user(doomed)
            if self.roots_fingerprint() != fingerprint:
                raise WriterActive(self.path, "refs moved while gc was planning")
            for lease in self.leases():
                if lease.stale:
                    self._delete(f"leases/{lease.lease_id.hex()}")
            crash_point("gc.before-commit")
            self._parallel(lambda snapshot_id: self._delete(f"snapshots/{snapshot_id.hex()}"), snapshot_ids)
            self._check_no_user(doomed)  # a reader that pinned meanwhile keeps the chunks it needs
            self._parallel(lambda key: self._delete(f"chunks/{key.hex()}"), chunk_keys)
            crash_point("gc.committed")
        finally:
            self._delete("locks/gc")

    def _check_no_user(self, doomed: set[bytes]) -> None:
        blocking = blocking_leases(self.leases(), doomed)
        if blocking:
            raise WriterActive(self.path, "; ".join(lease.describe() for lease in blocking))

    def usage(self) -> dict[str, int]:
        """Bytes stored (an object store has no map or reader slots: `capabilities.memory_map`)."""
        return {"file_bytes": sum(size for _, size in self._list(""))}

    def stat(self) -> dict[str, int]:
        """Objects per kind and bytes stored, from one listing."""
        listing = self._list("")
        counts = {name: 0 for name in ("chunks", "snapshots", "refs", "reflog")}
        for path, _ in listing:
            kind = path.split("/", 1)[0]
            if kind in counts:
                counts[kind] += 1
        counts["file_bytes"] = sum(size for _, size in listing)
        return counts

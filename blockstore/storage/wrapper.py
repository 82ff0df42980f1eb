"""`StoreWrapper`: a store in front of another, forwarding every contract member explicitly.

A wrapper overrides only what it changes (the read-through cache: chunk reads; the tests' faulty
store: what chosen chunks read back as). Forwarding is written out member by member, not through
`__getattr__`, so a member added to `Store` must be added here too (the store suite, run on the
wrappers, fails otherwise), and a wrapper never silently passes on something it should intercept.
`get_many`, `contains` and `pinned_snapshots` come from `StoreBase`, built on this wrapper's own
`get`, `stored_sizes` and `leases`, so an override of those is seen by them as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from blockstore.core.hashing import ChunkKey
from blockstore.storage.base import Capabilities, Fingerprint, Lease, Location, ReflogEntry, Store, StoreBase

_T = TypeVar("_T")


class StoreWrapper(StoreBase):
    """Every `Store` member, forwarded to `inner`."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    @property
    def path(self) -> Location:
        return self.inner.path

    @property
    def readonly(self) -> bool:
        return self.inner.readonly

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    # chunks -------------------------------------------------------------------------------------

    def get(self, key: ChunkKey) -> bytes:
        return self.inner.get(key)

    def with_value(self, key: ChunkKey, use: Callable[[bytes | memoryview], _T]) -> _T:
        return self.inner.with_value(key, use)

    def value_start(self, key: ChunkKey, length: int) -> bytes:
        return self.inner.value_start(key, length)

    def map_ordered(self, function: Callable[[Any], _T], items: Iterable[Any]) -> Iterator[_T]:
        return self.inner.map_ordered(function, items)

    def stored_sizes(self, keys: Iterable[ChunkKey]) -> dict[ChunkKey, int]:
        return self.inner.stored_sizes(keys)

    def put_batch(self, items: Iterable[tuple[ChunkKey, bytes]]) -> int:
        return self.inner.put_batch(items)

    def delete_batch(self, keys: Iterable[ChunkKey]) -> int:
        return self.inner.delete_batch(keys)

    @property
    def deltas_allowed(self) -> bool:
        return self.inner.deltas_allowed

    def allow_deltas(self) -> None:
        self.inner.allow_deltas()

    def iter_keys(self) -> Iterator[ChunkKey]:
        return self.inner.iter_keys()

    # catalog ------------------------------------------------------------------------------------

    def get_snapshot_bytes(self, snapshot_id: bytes) -> bytes | None:
        return self.inner.get_snapshot_bytes(snapshot_id)

    def put_snapshot(self, snapshot_id: bytes, data: bytes) -> None:
        self.inner.put_snapshot(snapshot_id, data)

    def snapshot_ids(self) -> list[bytes]:
        return self.inner.snapshot_ids()

    def refs(self) -> dict[str, bytes]:
        return self.inner.refs()

    def get_ref(self, name: str) -> bytes | None:
        return self.inner.get_ref(name)

    def move_ref(self, name: str, new: bytes, expected: bytes | None, op: str, message: str) -> None:
        self.inner.move_ref(name, new, expected, op, message)

    def reflog(self, name: str) -> list[ReflogEntry]:
        return self.inner.reflog(name)

    # leases -------------------------------------------------------------------------------------

    def acquire_lease(self, pin: bytes | None = None) -> bytes:
        return self.inner.acquire_lease(pin)

    def release_lease(self, lease_id: bytes) -> None:
        self.inner.release_lease(lease_id)

    def leases(self) -> list[Lease]:
        return self.inner.leases()

    # housekeeping -------------------------------------------------------------------------------

    def roots_fingerprint(self) -> Fingerprint:
        return self.inner.roots_fingerprint()

    def collect(
        self, snapshot_ids: list[bytes], chunk_keys: list[ChunkKey], fingerprint: Fingerprint
    ) -> None:
        self.inner.collect(snapshot_ids, chunk_keys, fingerprint)

    def usage(self) -> dict[str, int]:
        return self.inner.usage()

    def stat(self) -> dict[str, int]:
        return self.inner.stat()

    def meta_int(self, name: str) -> int | None:
        return self.inner.meta_int(name)

    def close(self) -> None:
        self.inner.close()

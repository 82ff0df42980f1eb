"""Where a store's bytes live: one contract (`base.Store`), its backends (LMDB, S3) and wrappers.

`open_store` is the one place a location becomes a store: a directory is an `LmdbStore`, an
`s3://` URL an `ObjectStore` (behind a `ReadThroughCache` when a cache directory is named).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeGuard

from blockstore.sizes import parse_size
from blockstore.storage.base import Capabilities, Location, Store
from blockstore.storage.cache import CACHE_ENV, CACHE_SIZE_ENV, DEFAULT_CACHE_BYTES, ReadThroughCache
from blockstore.storage.lmdb import LmdbStore

__all__ = ["Capabilities", "Location", "Store", "create_store", "is_url", "open_store"]


def is_url(location: object) -> TypeGuard[str]:
    """Whether a store location names an object store rather than an LMDB directory."""
    return isinstance(location, str) and location.startswith("s3://")


def open_store(location: Location, *, readonly: bool = False, cache: Location | None = None) -> Store:
    """The store at `location`. An object store gets a local read-through cache when `cache` (or
    the BLOCKSTORE_CACHE environment variable) names a directory; BLOCKSTORE_S3_CONCURRENCY sets how
    many requests it keeps in flight for batch operations (the runtime's decode threads add theirs)."""
    if not is_url(location):
        return LmdbStore(Path(location), readonly=readonly)
    from blockstore.storage.s3 import (  # obstore only when used
        CONCURRENCY_ENV,
        DEFAULT_CONCURRENCY,
        ObjectStore,
    )

    concurrency = int(os.environ.get(CONCURRENCY_ENV) or DEFAULT_CONCURRENCY)
    remote = ObjectStore(str(location), readonly=readonly, concurrency=concurrency)
    cache = cache or (Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else None)
    if cache is None:
        return remote
    budget = parse_size(os.environ.get(CACHE_SIZE_ENV), CACHE_SIZE_ENV) or DEFAULT_CACHE_BYTES
    return ReadThroughCache(remote, Path(cache), budget)


def create_store(location: Location, params: dict[str, int]) -> Store:
    """A new, empty store at `location` holding creation `params`; refuses one that exists."""
    if is_url(location):
        from blockstore.storage.s3 import ObjectStore

        return ObjectStore.create(str(location), params)
    return LmdbStore.create(Path(location), params)

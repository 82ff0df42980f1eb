"""A store wrapper that damages what chosen chunks read back as (borg's and zarr's habit of
testing the layers above storage with a store that lies). With no faults it is the store it wraps
(the shared store suite checks that, in test_faulty_store.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from blockstore.core.hashing import ChunkKey
from blockstore.errors import ChunkMissing
from blockstore.storage import Store
from blockstore.storage.wrapper import StoreWrapper

_T = TypeVar("_T")
FLIP = "flip"
MISSING = "missing"
SHORT = "short"
FAULT_KINDS = (FLIP, MISSING, SHORT)


@dataclass(frozen=True)
class Fault:
    """`flip`: bit `at` (mod the value's bits) inverted; `missing`: the key is gone;
    `short`: only the first `at` (mod the length) bytes come back."""

    kind: str
    at: int = 0

    def apply(self, key: ChunkKey, value: bytes) -> bytes:
        if self.kind == MISSING:
            raise ChunkMissing(key.hex())
        if self.kind == SHORT:
            return value[: self.at % max(1, len(value))]
        damaged = bytearray(value)
        bit = self.at % (8 * len(damaged))
        damaged[bit // 8] ^= 1 << (bit % 8)
        return bytes(damaged)


class FaultyStore(StoreWrapper):
    """Every read of a key in `faults` comes back damaged; everything else is the real store's."""

    def __init__(self, inner: Store, faults: dict[ChunkKey, Fault] | None = None) -> None:
        super().__init__(inner)
        self.faults = dict(faults or {})

    def get(self, key: ChunkKey) -> bytes:
        value = self.inner.get(key)
        fault = self.faults.get(key)
        return fault.apply(key, value) if fault else value

    def with_value(self, key: ChunkKey, use: Callable[[bytes | memoryview], _T]) -> _T:
        return use(self.get(key))

    def stored_sizes(self, keys: Iterable[ChunkKey]) -> dict[ChunkKey, int]:
        sizes = self.inner.stored_sizes(keys)
        return {key: size for key, size in sizes.items() if self.faults.get(key, Fault("")).kind != MISSING}

"""One test suite every ChunkStore backend must pass (zarr's StoreTests, restic's backend tests).

Subclass `ChunkStoreSuite` in a backend's test module and provide a `store` fixture.
"""

from __future__ import annotations

import pytest

from blockstore.errors import ChunkMissing
from blockstore.hashing import chunk_key


def item(text: str) -> tuple[bytes, bytes]:
    value = text.encode() * 10
    return chunk_key(value), value


class ChunkStoreSuite:
    def test_put_get_roundtrip(self, store) -> None:
        key, value = item("a")
        assert store.put_batch([(key, value)]) == len(value)
        assert store.get(key) == value

    def test_missing_key_raises(self, store) -> None:
        with pytest.raises(ChunkMissing, match=chunk_key(b"nope").hex()):
            store.get(chunk_key(b"nope"))

    def test_put_is_idempotent_and_never_overwrites(self, store) -> None:
        key, value = item("b")
        store.put_batch([(key, value)])
        assert store.put_batch([(key, b"other bytes")]) == 0
        assert store.get(key) == value

    def test_contains_and_sizes(self, store) -> None:
        present, value = item("c")
        absent, _ = item("d")
        store.put_batch([(present, value)])
        assert store.contains([present, absent]) == {present}
        assert store.stored_sizes([present, absent]) == {present: len(value)}

    def test_batch_and_iteration(self, store) -> None:
        items = [item(str(n)) for n in range(50)]
        assert store.put_batch(items) == sum(len(v) for _, v in items)
        assert sorted(store.iter_keys()) == sorted(k for k, _ in items)

    def test_delete_batch(self, store) -> None:
        items = [item(str(n)) for n in range(5)]
        store.put_batch(items)
        assert store.delete_batch([k for k, _ in items[:2]] + [chunk_key(b"absent")]) == 2
        assert sorted(store.iter_keys()) == sorted(k for k, _ in items[2:])
        with pytest.raises(ChunkMissing):
            store.get(items[0][0])

    def test_empty_value(self, store) -> None:
        key = chunk_key(b"")
        store.put_batch([(key, b"")])
        assert store.get(key) == b""

"""Stores and bundles written before framed chunk values (store /1, bundle version 1) still read,
and a /1 store becomes /2 exactly when a framed value may land in it."""

from __future__ import annotations

from pathlib import Path

import lmdb
import obstore
import torch

from blockstore import runtime
from blockstore.core.hashing import digest
from blockstore.repo import Repository
from blockstore.storage.lmdb import STORE_FORMAT
from blockstore.storage.s3 import OBJECT_FORMAT, ObjectStore

from .helpers import cli, random_tensor, write_safetensors
from .test_framing import _as_earlier_pack
from .test_fuzz import _sealed, _sections

OLD_FORMAT = b"blockstore-lmdb/1"


def _model(path: Path, seed: int) -> Path:
    tensors = {
        "embed.weight": random_tensor("BF16", (256, 64), seed=seed),
        "layers.0.mlp.up.weight": random_tensor("F32", (64, 64), seed=seed + 1),
    }
    return write_safetensors(path, tensors)


def _as_format_1(store: Path) -> None:
    """Rewrite every chunk value in the msgpack layout of earlier packs and mark the store /1."""
    env = lmdb.open(str(store), max_dbs=8)
    with env.begin(write=True) as txn:
        chunks = env.open_db(b"chunks", txn=txn)
        for key, value in list(txn.cursor(db=chunks)):
            txn.put(key, _as_earlier_pack(value), db=chunks)
        txn.put(b"format", OLD_FORMAT, db=env.open_db(b"meta", txn=txn))
    env.close()


def _format(store: Path) -> bytes:
    env = lmdb.open(str(store), max_dbs=8, readonly=True)
    with env.begin() as txn:
        found = txn.get(b"format", db=env.open_db(b"meta", txn=txn, create=False))
    env.close()
    return found


def _tensors(store: Path) -> dict[str, bytes]:
    with runtime.open(store) as state:
        return {name: bytes(t.view(torch.uint8).reshape(-1).numpy()) for name, t in state.load_all().items()}


def test_a_format_1_store_reads_and_becomes_2_with_its_first_chunk_write(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = _model(tmp_path / "first.safetensors", seed=1)
    assert cli("init", store).exit_code == 0
    assert cli("pack", first, "--store", store).exit_code == 0
    framed = _tensors(store)
    with Repository.open(store, readonly=True) as repo:
        first_id = repo.resolve("main").hex()
    _as_format_1(store)
    assert _format(store) == OLD_FORMAT
    assert _tensors(store) == framed
    assert cli("verify", store, "--deep").exit_code == 0
    assert _format(store) == OLD_FORMAT  # reading never upgrades
    second = _model(tmp_path / "second.safetensors", seed=5)
    assert cli("pack", second, "--store", store).exit_code == 0
    assert _format(store) == STORE_FORMAT.encode()
    assert cli("verify", store, "--deep").exit_code == 0
    assert cli("export", f"{store}@{first_id[:12]}", tmp_path / "out.safetensors").exit_code == 0
    assert digest((tmp_path / "out.safetensors").read_bytes()) == digest(first.read_bytes())


def test_a_version_1_bundle_is_applied(tmp_path: Path) -> None:
    publisher, consumer = tmp_path / "publisher", tmp_path / "consumer"
    base = _model(tmp_path / "base.safetensors", seed=1)
    for store in (publisher, consumer):
        assert cli("init", store).exit_code == 0
        assert cli("pack", base, "--store", store).exit_code == 0
    with Repository.open(publisher, readonly=True) as repo:
        base_id = repo.resolve("main").hex()
    assert cli("pack", _model(tmp_path / "next.safetensors", seed=7), "--store", publisher).exit_code == 0
    bundle = tmp_path / "update.bsp"
    assert cli("diff", publisher, base_id, "main", "-o", bundle).exit_code == 0
    (magic, _, flags, _), header, snapshot, values = _sections(bundle.read_bytes())
    earlier, offset = [], 0
    for chunk in header["chunks"]:
        value = _as_earlier_pack(values[offset : offset + chunk[2]])
        offset += chunk[2]
        chunk[2] = len(value)
        earlier.append(value)
    bundle.write_bytes(_sealed((magic, 1, flags, 0), header, snapshot, b"".join(earlier)))
    assert cli("apply", consumer, bundle).exit_code == 0
    assert _tensors(consumer) == _tensors(publisher)


def test_a_format_1_object_store_is_marked_2_before_its_first_chunk_write(moto_url: str) -> None:
    with ObjectStore.create(moto_url) as store:
        obstore.put(store.client, "meta/format", b"blockstore-s3/1")
    with ObjectStore(moto_url) as store:
        assert bytes(obstore.get(store.client, "meta/format").bytes()) == b"blockstore-s3/1"
        store.put_batch([(b"k" * 16, b"value")])
        assert bytes(obstore.get(store.client, "meta/format").bytes()) == OBJECT_FORMAT.encode()

"""Patches: diff → bundle → apply → rollback → log → gc, and every refusal leaves the store as it was."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import blockstore
import blockstore.core.chunks as chunks_module
import blockstore.repo as repo_module
from blockstore import patches, runtime
from blockstore.codecs import Zstd
from blockstore.core.chunks import BaseReader
from blockstore.core.hashing import strong_digest
from blockstore.core.manifests import ChunkRef, TensorEntry, merkle_digest
from blockstore.errors import BundleRejected, InvalidArgument, RefNotFound, WriterActive, WrongBase
from blockstore.ops.gc import gc
from blockstore.ops.pack import pack
from blockstore.ops.verify import verify
from blockstore.patches.bundle import BundleChunk, read_bundle, read_key, write_bundle
from blockstore.repo import Repository
from blockstore.storage.base import short_id

from .helpers import RawTensor, assert_one_line_error, cli, random_tensor, sha256, write_safetensors
from .legacy_snapshots import as_version_2

MLP = "encoder.layer.0.intermediate.dense.weight"


def make_v2(v1: Path, out: Path) -> Path:
    """v1 with one MLP weight scaled, an embedding row range replaced, a tensor added and one dropped."""
    weights = load_file(str(v1))
    weights[MLP] = weights[MLP] * np.float32(1.01)
    embeddings = weights["embeddings.word_embeddings.weight"].copy()
    embeddings[1000:1100] = 0.5
    weights["embeddings.word_embeddings.weight"] = embeddings
    weights["adapter.weight"] = np.ones((16, 384), np.float32)
    del weights["encoder.layer.5.output.LayerNorm.bias"]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={"format": "pt"})
    return out


def test_real_model_update_scenario(tmp_path: Path, minilm_path: Path) -> None:
    v2_path = make_v2(minilm_path, tmp_path / "v2" / "model.safetensors")
    publisher, consumer = tmp_path / "publisher", tmp_path / "consumer"
    for store in (publisher, consumer):
        cli("init", store)
        assert cli("pack", minilm_path, "-s", store, "-m", "v1").exit_code == 0
    cli("tag", publisher, "v1")
    cli("pack", v2_path, "-s", publisher, "-m", "v2")

    bundle = tmp_path / "update.bsp"
    made = cli("diff", publisher, "v1", "main", "-o", bundle, "--json").json()
    assert made["changed"] == sorted([MLP, "embeddings.word_embeddings.weight"])
    assert made["added"] == ["adapter.weight"] and made["removed"] == [
        "encoder.layer.5.output.LayerNorm.bias"
    ]
    assert made["bundle_bytes"] < 0.1 * made["model_stored_bytes"]

    applied = cli("apply", consumer, bundle, "--json")
    assert applied.exit_code == 0, applied.stderr
    cli("export", consumer, tmp_path / "v2.out")
    assert sha256(tmp_path / "v2.out") == sha256(v2_path)

    assert cli("rollback", consumer).exit_code == 0
    cli("export", consumer, tmp_path / "v1.out")
    assert sha256(tmp_path / "v1.out") == sha256(minilm_path)

    entries = cli("log", consumer, "--json").json()["entries"]
    assert [e["op"] for e in entries] == ["pack", "apply", "rollback"]
    assert entries[1]["tensors_changed"] == 4 and entries[2]["new"] == entries[0]["new"]

    # Drop v1: move main forward to v2 again, then collect everything only v1 reached.
    assert cli("rollback", consumer, "--to", applied.json()["new"]).exit_code == 0
    collected = cli("gc", consumer, "--keep", "0", "--json").json()
    assert len(collected["deleted_snapshots"]) == 1 and collected["deleted_chunks"] > 0
    assert cli("verify", "--deep", consumer).exit_code == 0
    cli("export", consumer, tmp_path / "v2.again")
    assert sha256(tmp_path / "v2.again") == sha256(v2_path)


def test_one_tensor_bundle_is_close_to_that_tensors_compressed_size(
    tmp_path: Path, minilm_path: Path
) -> None:
    weights = load_file(str(minilm_path))
    weights[MLP] = weights[MLP] * np.float32(0.5)
    changed = tmp_path / "changed.safetensors"
    save_file(weights, str(changed), metadata={"format": "pt"})
    with Repository.init(tmp_path / "store") as repo:
        pack(repo, [minilm_path])
        result = patches.diff(repo, "main", str(changed), tmp_path / "one.bsp")
        tensor_stored = repo.snapshot(result.target).tensors[MLP].stored_bytes
    assert result.changes.changed == (MLP,) and not result.changes.added and not result.changes.removed
    assert result.bundle_bytes <= tensor_stored * 1.05 + 64 * 1024


def test_diff_from_a_file_says_which_snapshot_it_stored(tmp_path: Path) -> None:
    old = write_safetensors(tmp_path / "old.safetensors", {"a": random_tensor("F32", (64, 64), 1)})
    new = write_safetensors(tmp_path / "new.safetensors", {"a": random_tensor("F32", (64, 64), 2)})
    with Repository.init(tmp_path / "store", chunk_size=4096) as repo:
        pack(repo, [new])
        by_ref = patches.diff(repo, "main", "main", tmp_path / "none.bsp")
        assert by_ref.notes == [] and by_ref.to_json()["notes"] == []

        result = patches.diff(repo, str(old), "main", tmp_path / "update.bsp")
        [note] = result.notes
        assert note == (
            f"packed {old} into the store as snapshot {short_id(result.base)} "
            "(no ref points at it, so the next gc removes it)"
        )
        assert result.to_json()["notes"] == [note] and result.to_json()["base"] == result.base.hex()
        assert repo.has_snapshot(result.base) and result.base not in repo.refs().values()
        assert gc(repo).deleted_snapshots == (result.base.hex(),)  # as the note says
        assert not repo.has_snapshot(result.base)


# --- refusals ----------------------------------------------------------------------------------------


@pytest.fixture
def update(tmp_path: Path):
    """(consumer store holding v1, bundle v1→v2, v2 file). Small synthetic model for speed."""
    v1 = write_safetensors(
        tmp_path / "v1.safetensors",
        {"a": random_tensor("F32", (64, 64), 1), "b": random_tensor("F32", (64, 64), 2)},
    )
    v2 = write_safetensors(
        tmp_path / "v2.safetensors",
        {"a": random_tensor("F32", (64, 64), 1), "b": random_tensor("F32", (64, 64), 3)},
    )
    # Both stores cut 4 KiB chunks; `diff` packs v2 on the fly with the publisher's chunk size.
    with Repository.init(tmp_path / "publisher", chunk_size=4096) as repo:
        pack(repo, [v1])
        patches.diff(repo, "main", str(v2), tmp_path / "update.bsp")
    consumer = tmp_path / "consumer"
    with Repository.init(consumer, chunk_size=4096) as repo:
        pack(repo, [v1])
    return consumer, tmp_path / "update.bsp", v2


def state(store: Path) -> tuple:
    with Repository.open(store, readonly=True) as repo:
        return repo.store.refs(), sorted(repo.store.snapshot_ids()), verify(repo, deep=True).clean


def refused(store: Path, bundle: Path, *fragments: str, extra: tuple = ()) -> None:
    before = state(store)
    assert_one_line_error(cli("apply", store, bundle, *extra), *fragments)
    assert state(store) == before and before[2]


def test_apply_succeeds_and_ships_only_missing_chunks(update) -> None:
    store, bundle, _ = update
    assert len(read_bundle(bundle).chunks) == 4  # only tensor b changed: 16 KiB in 4 KiB chunks
    assert cli("apply", store, bundle).exit_code == 0


def test_wrong_base_is_refused(update, tmp_path: Path) -> None:
    store, bundle, _ = update
    other = write_safetensors(tmp_path / "other.safetensors", {"z": random_tensor("U8", (8,))})
    cli("pack", other, "-s", store)
    refused(store, bundle, "applies to snapshot", "ref 'main' is at")


def test_truncated_bundle(update) -> None:
    store, bundle, _ = update
    bundle.write_bytes(bundle.read_bytes()[:-100])
    refused(store, bundle, "bundle rejected")


@pytest.mark.parametrize("where", [0, 9, 21, 60, 0.5, -40, -1])
def test_flipped_byte_anywhere(update, where: float) -> None:
    store, bundle, _ = update
    data = bytearray(bundle.read_bytes())
    index = int(len(data) * where) if isinstance(where, float) else where
    data[index] ^= 0x40
    bundle.write_bytes(bytes(data))
    refused(store, bundle, "bundle rejected")


def test_unknown_format_version(update) -> None:
    store, bundle, _ = update
    data = bytearray(bundle.read_bytes())
    data[8] = 99
    bundle.write_bytes(bytes(data))
    refused(store, bundle, "format version 99 is not supported")


def test_mac_key_required_and_checked(update, tmp_path: Path) -> None:
    store, _, v2 = update
    key, wrong = tmp_path / "key", tmp_path / "wrong"
    key.write_bytes(os.urandom(32))
    wrong.write_bytes(os.urandom(32))
    signed = tmp_path / "signed.bsp"
    with Repository.open(tmp_path / "publisher") as repo:
        patches.diff(
            repo,
            "main",
            str(v2),
            signed,
            key=read_key(key),
        )
    refused(store, signed, "bundle is signed; pass --key")
    refused(store, signed, "MAC mismatch", extra=("--key", wrong))
    refused(store, update[1], "not signed", extra=("--key", key))
    assert cli("apply", store, signed, "--key", key).exit_code == 0


def test_colliding_chunk_with_other_bytes_is_refused(
    update, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, _ = update
    with Repository.open(store) as repo:
        snapshot_id = repo.resolve("main")
        snapshot = repo.snapshot(snapshot_id)
        held = snapshot.tensors["a"].chunks[0]
        impostor = chunks_module.encode_chunk(chunks_module.Raw(), memoryview(bytes(held.raw_len)))
        forged = tmp_path / "forged.bsp"
        write_bundle(
            forged,
            snapshot_id,
            snapshot.content_id,
            snapshot_id,
            repo.store.get_snapshot_bytes(snapshot_id),
            [(BundleChunk(held.key, held.raw_len, len(impostor)), impostor)],
        )
    # xxh3 collisions cannot be found on demand: make every chunk hash to the held key instead.
    before = state(store)
    monkeypatch.setattr(chunks_module, "chunk_key", lambda raw: held.key)
    # (to another ref: applying a bundle whose target a ref already holds does nothing at all)
    result = cli("apply", store, forged, "--ref", "other", "--force-base")
    assert_one_line_error(result, "collides with a stored chunk of other bytes")
    monkeypatch.undo()
    assert state(store) == before and before[2]


def test_target_chunk_neither_shipped_nor_present(update, tmp_path: Path) -> None:
    store, bundle, _ = update
    original = read_bundle(bundle)
    stripped = tmp_path / "stripped.bsp"
    kept = list(original.chunk_values())[1:]
    write_bundle(stripped, original.base, original.base_content, original.target, original.snapshot, kept)
    refused(store, stripped, "which neither the bundle nor the store has")


def test_python_api_errors(update) -> None:
    store, bundle, _ = update
    with Repository.open(store) as repo:
        first = patches.apply(repo, bundle)
        again = patches.apply(repo, bundle)  # a re-run (say, after a crash) finds it done
        assert again.old == again.new == first.new and again.chunks_added == 0
        with pytest.raises(WrongBase):
            patches.apply(repo, bundle, ref="other")
        with pytest.raises(BundleRejected):
            patches.apply(repo, bundle, key=b"k" * 32)


# --- gc ------------------------------------------------------------------------------------------------


def test_gc_deletes_nothing_while_a_writer_holds_a_lease(update) -> None:
    store, bundle, _ = update
    with Repository.open(store) as repo:
        patches.apply(repo, bundle)
        patches.rollback(repo)
        lease = repo.store.acquire_lease()
        with pytest.raises(WriterActive, match=f"pid {os.getpid()}"):
            gc(repo, keep=0)
        assert len(repo.store.snapshot_ids()) == 2
        assert gc(repo, keep=0, dry_run=True).deleted_chunks == 4
        repo.store.release_lease(lease)
        assert gc(repo, keep=0).deleted_chunks == 4
        assert verify(repo, deep=True).clean


def test_gc_ignores_a_stale_lease_of_a_dead_process(update) -> None:
    store, bundle, _ = update
    # A writer that took its lease and died without releasing it.
    crashed_writer = (
        "import sys, pathlib; from blockstore.storage.lmdb import LmdbStore; "
        "LmdbStore(pathlib.Path(sys.argv[1])).acquire_lease()"
    )
    subprocess.run([sys.executable, "-c", crashed_writer, str(store)], check=True)
    [lease] = cli("doctor", store, "--json").json()["leases"]
    assert lease["role"] == "writer" and lease["stale"]
    assert "stale: process gone" in cli("doctor", store).stdout
    with Repository.open(store) as repo:
        patches.apply(repo, bundle)
        patches.rollback(repo)
        assert gc(repo, keep=0).deleted_chunks == 4
    assert cli("doctor", store, "--json").json()["leases"] == []  # gc removed the stale lease


def test_gc_deletes_nothing_if_a_reader_pins_a_doomed_snapshot_meanwhile(
    update, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, bundle, _ = update
    with Repository.open(store) as repo:
        applied = patches.apply(repo, bundle).new
        patches.rollback(repo)  # the applied version is now reachable only from the reflog
        plain_collect = type(repo.store).collect

        def reader_pins_first(store_self, snapshot_ids, chunk_keys, fingerprint) -> None:
            assert applied in snapshot_ids
            store_self.acquire_lease(pin=applied)  # a reader opened it between plan and delete
            plain_collect(store_self, snapshot_ids, chunk_keys, fingerprint)

        monkeypatch.setattr(type(repo.store), "collect", reader_pins_first)
        with pytest.raises(WriterActive, match=f"reader of {short_id(applied)}"):
            gc(repo, keep=0)
        assert repo.store.get_snapshot_bytes(applied) is not None
        monkeypatch.undo()
        assert applied in repo.store.pinned_snapshots()
        assert gc(repo, keep=0).deleted_snapshots == ()  # pinned: a root, like a ref


def test_rollback_refusals(update) -> None:
    store, _, _ = update
    assert_one_line_error(cli("rollback", store), "has 0 earlier versions")
    assert_one_line_error(cli("rollback", store, "--ref", "nope"), "ref 'nope' does not exist", exit_code=3)
    assert_one_line_error(cli("rollback", store, "--to", "deadbeef"), "does not exist", exit_code=3)
    assert_one_line_error(cli("tag", store, "main"), "already exists")
    assert_one_line_error(cli("gc", store, "--keep", "-1"), "--keep must be 0 or more")


def test_api_refusals_match_the_cli(update) -> None:
    store, _, _ = update
    with Repository.open(store) as repo:
        with pytest.raises(InvalidArgument, match="--keep must be 0 or more"):
            gc(repo, keep=-1)
        with pytest.raises(RefNotFound):
            patches.log(repo, "nope")


# --- bounded work: verify what is new, refuse what grows without bound ---------------------------------


def bomb_bundle(
    store: Path, out: Path, *, chunk_len: int, repeats: int, version: int = 3
) -> tuple[Path, int]:
    """A valid bundle onto `store`'s main whose target adds tensor "bomb": one zstd zero chunk of
    `chunk_len` bytes referenced `repeats` times. Version 3 gives it its true digest (a hash of the
    chunk list: cheap to make however large the tensor); an older target has a made-up digest (the
    true one would take as long to make as the bomb takes to check). Returns the bundle and the
    bomb's byte length."""
    zeros = bytes(chunk_len)
    key = chunks_module.chunk_key(zeros)
    value = chunks_module.encode_chunk(Zstd(19), memoryview(zeros))
    nbytes = chunk_len * repeats
    with Repository.open(store) as repo:
        base_id = repo.resolve("main")
        if version < 3:
            base_id = as_version_2(repo, base_id)
            repo.move_ref("main", base_id, repo.resolve("main"), "pack", "")
        base = repo.snapshot(base_id)
    strong = strong_digest(zeros) if version >= 3 else None
    chunks = tuple(ChunkRef(key, chunk_len, len(value), strong) for _ in range(repeats))
    tensor_digest = merkle_digest("U8", (nbytes,), chunks) if version >= 3 else bytes(32)
    bomb = TensorEntry(
        "bomb", "U8", (nbytes,), "static", "lossless", "zstd", chunks, tensor_digest, merkle=version >= 3
    )
    first = base.files[0]
    files = (replace(first, tensors=(*first.tensors, "bomb")), *base.files[1:])
    target = replace(base, files=files, tensors={**base.tensors, "bomb": bomb}, parent=base_id)
    data = target.to_bytes()
    write_bundle(
        out, base_id, base.content_id, target.id, data, [(BundleChunk(key, chunk_len, len(value)), value)]
    )
    return out, nbytes


@pytest.mark.parametrize("version", [2, 3])
def test_a_small_bundle_declaring_a_huge_tensor_is_refused_before_decoding(
    update, tmp_path: Path, version: int
) -> None:
    store, _, _ = update
    # 64 GiB of one 64 MiB zero chunk in a bundle of some 30 KiB: apply used to decode and hash all
    # of it (minutes) before the tensor digest refused it. In version 3 the digest is true, so only
    # the bound stands between this bundle and a store serving a 64 GiB tensor.
    bundle, nbytes = bomb_bundle(
        store, tmp_path / "bomb.bsp", chunk_len=64 << 20, repeats=1024, version=version
    )
    size = bundle.stat().st_size
    assert size < 96 << 10 and nbytes == 64 << 30
    started = time.monotonic()
    refused(store, bundle, "bomb.bsp: bundle rejected", f"declares {nbytes} new tensor bytes", "--max-growth")
    assert time.monotonic() - started < 5  # two deep verifies of a tiny store included
    with Repository.open(store) as repo, pytest.raises(BundleRejected, match=f"limit of {64 * size} "):
        patches.apply(repo, bundle)


def test_max_growth_admits_a_trusted_repetitive_bundle(update, tmp_path: Path) -> None:
    store, _, _ = update
    bundle, nbytes = bomb_bundle(store, tmp_path / "zeros.bsp", chunk_len=256 << 10, repeats=64)
    refused(store, bundle, f"declares {nbytes} new tensor bytes, over the limit")
    assert_one_line_error(cli("apply", store, bundle, "--max-growth", "0"), "--max-growth must be")
    with pytest.raises(BundleRejected, match="over the limit"):
        blockstore.apply(store, bundle, max_growth=64)
    applied = cli("apply", store, bundle, "--max-growth", "100000", "--json")
    assert applied.exit_code == 0, applied.stderr
    assert applied.json()["chunks_added"] == 1
    with Repository.open(store) as repo:
        assert verify(repo, deep=True).clean
    with runtime.open(store) as state:
        assert not state["bomb"].materialize().any() and state["bomb"].materialize().numel() == nbytes


@pytest.mark.parametrize("version", [2, 3])
def test_apply_decodes_only_the_new_tensors_chunks_each_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    layers = {f"layer.{i}": random_tensor("F32", (64, 64), i) for i in range(12)}
    v1 = write_safetensors(tmp_path / "v1.safetensors", layers)
    # One tensor changes; two of its four 4 KiB chunks are the same zeros, one is a base chunk.
    changed = bytearray(layers["layer.3"].data)
    changed[4096:12288] = bytes(8192)
    changed[12288:] = layers["layer.5"].data[:4096]
    v2 = write_safetensors(
        tmp_path / "v2.safetensors", {**layers, "layer.3": RawTensor("F32", (64, 64), bytes(changed))}
    )
    with Repository.init(tmp_path / "publisher", chunk_size=4096) as repo:
        old, new = pack(repo, [v1]).snapshot_id, pack(repo, [v2]).snapshot_id
        if version < 3:
            old = as_version_2(repo, old)
            new = as_version_2(repo, new, parent=old)
        patches.diff(repo, old.hex(), new.hex(), tmp_path / "one.bsp")
    with Repository.init(tmp_path / "consumer", chunk_size=4096) as repo:
        base = pack(repo, [v1]).snapshot_id
        if version < 3:
            repo.move_ref("main", as_version_2(repo, base), base, "pack", "")
        decoded: list[bytes] = []
        plain = chunks_module.decode_chunk_into

        def counting(
            key: bytes,
            value: bytes | memoryview,
            out: memoryview,
            strong: bytes | None = None,
            base: BaseReader | None = None,
        ) -> None:
            decoded.append(key)
            plain(key, value, out, strong, base)

        monkeypatch.setattr(chunks_module, "decode_chunk_into", counting)
        monkeypatch.setattr(repo_module, "decode_chunk_into", counting)
        result = patches.apply(repo, tmp_path / "one.bsp")
        monkeypatch.undo()
        wanted = [chunk.key for chunk in repo.snapshot(result.new).tensors["layer.3"].chunks]
        zeros = chunks_module.chunk_key(bytes(4096))
        assert len(set(wanted)) == 3 and zeros in wanted
        if version >= 3:  # the shipped chunk only: the base vouches for the two it reuses
            assert decoded == [zeros]
        else:  # the tensor's bytes are hashed: its 3 distinct chunks, of the model's 48, each once
            assert sorted(decoded) == sorted(set(wanted))
        assert verify(repo, deep=True).clean
    assert cli("export", tmp_path / "consumer", tmp_path / "v2.out").exit_code == 0
    assert sha256(tmp_path / "v2.out") == sha256(v2)

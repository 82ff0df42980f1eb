"""Chunk identity by strong digest (snapshot version 3): a chunk built to collide with another's
xxh3 key can neither be deduplicated into a tensor nor handed out by any reader; older snapshots
still read and verify by their byte digests."""

from __future__ import annotations

import struct
from pathlib import Path

import lmdb
import msgpack
import numpy as np
import pytest
import xxhash

from blockstore import patches, runtime
from blockstore.codecs import Raw
from blockstore.core.chunks import chunk_key, encode_chunk
from blockstore.core.hashing import strong_digest
from blockstore.core.manifests import ManifestError, Snapshot, merkle_digest
from blockstore.errors import BlockstoreError, ChunkCollision
from blockstore.ops.pack import pack
from blockstore.ops.transfer import transfer
from blockstore.ops.verify import verify
from blockstore.repo import Repository

from .helpers import RawTensor, assert_one_line_error, cli, random_tensor, sha256, write_safetensors
from .legacy_snapshots import as_version_2

XXH3_SECRET_HEAD = bytes.fromhex("b8fe6c3923a44bbe7c01812cf721ad1c")
"""The first 16 bytes of XXH3's default secret (kSecret): the secret words stripes 0 and 1 xor
into their first lane."""


def colliding_pair(seed: int, size: int = 4096) -> tuple[bytes, bytes]:
    """Two different `size`-byte strings with equal xxh3-128 (any size above 240 bytes, so XXH3's
    long-input path runs, and at least two stripes before the last).

    In that path each 64-byte stripe n adds, per 8-byte lane i, `data` to accumulator i^1 and
    `lo32(data ^ secret[8n + 8i]) * hi32(data ^ secret[8n + 8i])` to accumulator i, and the
    accumulators are scrambled only between 1 KiB blocks. Set lane 0's low half to the secret's low
    half in stripes 0 and 1: both products are zero whatever the high halves hold. Then adding d to
    stripe 0's high half and taking d from stripe 1's leaves the sum into accumulator 1, and so
    every accumulator and the hash, unchanged."""
    first = bytearray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    for stripe in (0, 1):
        struct.pack_into("<I", first, 64 * stripe, struct.unpack_from("<I", XXH3_SECRET_HEAD, 8 * stripe)[0])
    second = bytearray(first)
    shift = 0x9E3779B9
    high0, high1 = struct.unpack_from("<I", first, 4)[0], struct.unpack_from("<I", first, 68)[0]
    struct.pack_into("<I", second, 4, (high0 + shift) % 2**32)
    struct.pack_into("<I", second, 68, (high1 - shift) % 2**32)
    return bytes(first), bytes(second)


M1, M2 = colliding_pair(seed=17)
KEY = chunk_key(M1)


def test_the_pair_really_collides() -> None:
    assert M1 != M2 and len(M1) == len(M2) == 4096
    assert xxhash.xxh3_128_digest(M1) == xxhash.xxh3_128_digest(M2) == KEY
    assert strong_digest(M1) != strong_digest(M2)


def _model(path: Path, **tensors: bytes) -> Path:
    """A model of U8 tensors (one 4 KiB chunk each in a 4 KiB store) plus a random F32 weight."""
    contents = {"other": random_tensor("F32", (32, 32), 3)}
    contents.update({name: RawTensor("U8", (len(data),), data) for name, data in tensors.items()})
    return write_safetensors(path, contents)


def _poisoned_store(tmp_path: Path) -> Path:
    """A store whose chunk KEY holds M2, arrived by a valid bundle (M2 is what its tensor is)."""
    publisher, consumer = tmp_path / "publisher", tmp_path / "consumer"
    base = _model(tmp_path / "base.safetensors")
    for store in (publisher, consumer):
        Repository.init(store, chunk_size=4096).close()
        assert cli("pack", base, "-s", store).exit_code == 0
    with Repository.open(publisher) as repo:
        old = repo.resolve("main").hex()
        pack(repo, [_model(tmp_path / "poisoned.safetensors", carrier=M2)])
    assert cli("diff", publisher, old, "main", "-o", tmp_path / "poison.bsp").exit_code == 0
    assert cli("apply", consumer, tmp_path / "poison.bsp").exit_code == 0
    return consumer


@pytest.mark.parametrize("vouched", [True, False], ids=["vouched-by-a-ref", "decoded"])
def test_pack_refuses_to_dedup_against_a_colliding_chunk(tmp_path: Path, vouched: bool) -> None:
    store = _poisoned_store(tmp_path)
    if not vouched:  # no ref's snapshot references the chunk now: pack must decode it to know it
        assert cli("rollback", store).exit_code == 0
    with Repository.open(store) as repo:
        before = repo.refs(), repo.snapshot_ids()
    victim = _model(tmp_path / "victim.safetensors", weight=M1)
    result = cli("pack", victim, "-s", store)
    assert_one_line_error(result, "tensor 'weight'", f"chunk {KEY.hex()} collision", exit_code=4)
    with Repository.open(store) as repo:
        assert (repo.refs(), repo.snapshot_ids()) == before  # nothing published
        assert verify(repo, deep=True).clean


def test_a_model_holding_both_halves_of_a_collision_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    Repository.init(store, chunk_size=4096).close()
    both = _model(tmp_path / "both.safetensors", a=M1, b=M2)
    assert_one_line_error(cli("pack", both, "-s", store), "tensor 'b'", "collision", "this pack")
    assert cli("ls", store, "--json").json()["refs"] == {}


def _overwrite_chunk(store: Path, key: bytes, value: bytes) -> None:
    """Put other bytes under `key` behind blockstore's back (stores never overwrite a chunk)."""
    env = lmdb.open(str(store), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(key, value, db=env.open_db(b"chunks", txn=txn))
    env.close()


def test_no_reader_hands_out_bytes_the_snapshot_did_not_promise(tmp_path: Path) -> None:
    store = tmp_path / "store"
    Repository.init(store, chunk_size=4096).close()
    model = _model(tmp_path / "model.safetensors", weight=M1)
    assert cli("pack", model, "-s", store).exit_code == 0
    _overwrite_chunk(store, KEY, encode_chunk(Raw(), memoryview(M2)))  # hashes to KEY all the same
    with runtime.open(store) as state:
        assert bytes(state["other"].materialize().numpy().tobytes()) == random_tensor("F32", (32, 32), 3).data
        with pytest.raises(BlockstoreError, match="collision"):
            state["weight"].materialize()
    assert_one_line_error(cli("export", store, tmp_path / "out.safetensors"), "'weight'", "collision")
    assert not (tmp_path / "out.safetensors").exists()
    with Repository.open(store) as repo:
        [damage] = verify(repo, deep=True).damages
    assert damage.tensor == "weight" and "collision" in damage.detail


def test_pull_refuses_a_snapshot_promising_other_bytes_than_a_held_chunk(tmp_path: Path) -> None:
    source, destination = tmp_path / "source", tmp_path / "destination"
    for store, data in ((source, M1), (destination, M2)):
        Repository.init(store, chunk_size=4096).close()
        model = _model(tmp_path / f"{store.name}.safetensors", weight=data)
        assert cli("pack", model, "-s", store).exit_code == 0
    with Repository.open(destination) as repo:
        before = repo.refs(), repo.snapshot_ids()
    result = cli("pull", source, destination)
    assert_one_line_error(result, "tensor 'weight'", f"chunk {KEY.hex()} collision", exit_code=4)
    with Repository.open(source) as src, Repository.open(destination) as dst:
        assert (dst.refs(), dst.snapshot_ids()) == before
        dst.move_ref("main", before[0]["main"], before[0]["main"], "tag", "")  # nothing vouches now
        with pytest.raises(ChunkCollision):
            transfer(src, dst, "main")


# --- the version 3 snapshot ---------------------------------------------------------------------------


def test_a_version_3_tensor_digest_is_its_chunk_list_digest(tmp_path: Path) -> None:
    model = write_safetensors(tmp_path / "m.safetensors", {"w": random_tensor("BF16", (300, 64), 1)})
    with Repository.init(tmp_path / "store", chunk_size=4096) as repo:
        _check_chunk_digests(repo, repo.snapshot(pack(repo, [model]).snapshot_id))


def _check_chunk_digests(repo: Repository, snapshot: Snapshot) -> None:
    entry = snapshot.tensors["w"]
    assert snapshot.version == 3 and entry.merkle and len(entry.chunks) > 1
    data = bytearray()
    for chunk, raw in zip(entry.chunks, repo.tensor_chunks(snapshot.id, entry), strict=True):
        assert chunk.strong == strong_digest(raw)
        data += raw
    assert bytes(data) == random_tensor("BF16", (300, 64), 1).data
    assert entry.digest == merkle_digest("BF16", (300, 64), entry.chunks)
    fields = msgpack.unpackb(snapshot.to_bytes(), raw=False)
    assert fields[0] == 3 and len(fields[2][0][6][0]) == 4  # [key, raw_len, stored_len, strong]


@pytest.mark.parametrize("damage", ["digest", "strong", "no-strong", "short-strong"])
def test_a_version_3_snapshot_is_checked_when_read(tmp_path: Path, repo: Repository, damage: str) -> None:
    model = write_safetensors(tmp_path / "m.safetensors", {"w": random_tensor("F32", (64, 64), 1)})
    fields = msgpack.unpackb(repo.snapshot_bytes(pack(repo, [model]).snapshot_id), raw=False)
    entry = fields[2][0]
    if damage == "digest":
        entry[7] = bytes(32)
    elif damage == "strong":
        entry[6][0][3] = bytes(32)  # the digest no longer matches the chunk list
    elif damage == "no-strong":
        entry[6][0] = entry[6][0][:3]
    else:
        entry[6][0][3] = b"short"
    message = "digest does not match its chunk list" if damage in ("digest", "strong") else "malformed chunk"
    with pytest.raises(ManifestError, match=message):
        Snapshot.from_bytes(msgpack.packb(fields, use_bin_type=True))


def test_a_version_2_snapshot_still_reads_and_verifies_by_its_byte_digests(
    tmp_path: Path, minilm_path: Path
) -> None:
    store = tmp_path / "store"
    with Repository.init(store) as repo:
        packed = pack(repo, [minilm_path]).snapshot_id
        legacy = as_version_2(repo, packed)
        repo.move_ref("main", legacy, packed, "pack", "")
        snapshot = repo.snapshot(legacy)
        assert snapshot.version == 2 and not any(e.merkle for e in snapshot.tensors.values())
        assert verify(repo, "main", deep=True).clean
        # A damaged byte digest is found the old way: by hashing the tensor's bytes.
        fields = msgpack.unpackb(repo.snapshot_bytes(legacy), raw=False)
        fields[2][0][7] = bytes(32)
        forged = repo.store_snapshot_bytes(msgpack.packb(fields, use_bin_type=True))
        [damage] = verify(repo, forged.hex(), deep=True).damages
        assert damage.kind == "digest"
    assert cli("export", store, tmp_path / "out.safetensors").exit_code == 0
    assert sha256(tmp_path / "out.safetensors") == sha256(minilm_path)
    with runtime.open(store) as state:
        assert state[next(iter(snapshot.tensors))].materialize() is not None
    # A new pack over it writes version 3, reusing every chunk (each decoded once to learn it).
    with Repository.open(store) as repo:
        result = pack(repo, [minilm_path])
        assert result.new_chunks == 0 and not result.unchanged
        assert repo.snapshot(result.snapshot_id).version == 3
        assert patches.log(repo, "main")[-1].tensors_changed == 0  # a new form, the same tensors


def test_a_bundle_cannot_bring_one_half_of_a_collision_into_a_store_holding_the_other(tmp_path: Path) -> None:
    publisher, consumer = tmp_path / "publisher", tmp_path / "consumer"
    base = _model(tmp_path / "base.safetensors")
    for store in (publisher, consumer):
        Repository.init(store, chunk_size=4096).close()
        assert cli("pack", base, "-s", store).exit_code == 0
    with Repository.open(publisher) as repo:
        old = repo.resolve("main").hex()
        pack(repo, [_model(tmp_path / "update.safetensors", weight=M1)])
    assert cli("diff", publisher, old, "main", "-o", tmp_path / "update.bsp").exit_code == 0
    with Repository.open(consumer) as repo:  # M2 arrives under KEY by another way: a second ref
        pack(repo, [_model(tmp_path / "other.safetensors", carrier=M2)], ref="other")
        before = repo.refs(), repo.snapshot_ids()
    result = cli("apply", consumer, tmp_path / "update.bsp")
    assert_one_line_error(result, f"chunk {KEY.hex()} collides with a stored chunk", exit_code=4)
    with Repository.open(consumer) as repo:
        assert (repo.refs(), repo.snapshot_ids()) == before


def test_a_version_3_bundle_applies_to_a_ref_still_at_the_version_2_form_of_its_base(tmp_path: Path) -> None:
    publisher, consumer = tmp_path / "publisher", tmp_path / "consumer"
    base, update = _model(tmp_path / "base.safetensors"), _model(tmp_path / "update.safetensors", weight=M1)
    for store in (publisher, consumer):
        Repository.init(store, chunk_size=4096).close()
        assert cli("pack", base, "-s", store).exit_code == 0
    with Repository.open(publisher) as repo:
        old = repo.resolve("main").hex()
        pack(repo, [update])
    assert cli("diff", publisher, old, "main", "-o", tmp_path / "update.bsp").exit_code == 0
    with Repository.open(consumer) as repo:  # as an older blockstore packed it
        packed = repo.resolve("main")
        repo.move_ref("main", as_version_2(repo, packed), packed, "pack", "")
    applied = cli("apply", consumer, tmp_path / "update.bsp")
    assert applied.exit_code == 0, applied.stderr
    assert cli("export", consumer, tmp_path / "out.safetensors").exit_code == 0
    assert sha256(tmp_path / "out.safetensors") == sha256(update)
    # Another model's version 2 snapshot is still the wrong base.
    with Repository.open(consumer) as repo:
        other = pack(repo, [_model(tmp_path / "other.safetensors", zeros=bytes(4096))], ref=None).snapshot_id
        repo.move_ref("main", as_version_2(repo, other), repo.resolve("main"), "pack", "")
    assert_one_line_error(cli("apply", consumer, tmp_path / "update.bsp"), "applies to snapshot")

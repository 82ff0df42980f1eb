"""Damage is detected, named exactly, and never turned into a garbage tensor or a half-written file."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import lmdb
import msgpack
import numpy as np
import pytest
import zstandard

from blockstore.codecs import ByteGroupZstd, Zstd, framing
from blockstore.core.chunks import decode_chunk, encode_chunk
from blockstore.core.hashing import chunk_key
from blockstore.errors import ChunkCorrupt
from blockstore.ops.pack import pack
from blockstore.repo import Repository

from .helpers import assert_one_line_error, cli, random_tensor, write_safetensors


@pytest.fixture
def damaged(tmp_path: Path, store_path: Path):
    """A store with two tensors; returns (store, snapshot id hex, {tensor: first chunk key})."""
    model = write_safetensors(
        tmp_path / "model.safetensors",
        {
            "embed.weight": random_tensor("BF16", (256, 64), seed=1),
            "norm.weight": random_tensor("F32", (64,), seed=2),
        },
    )
    with Repository.open(store_path) as repo:
        result = pack(repo, [model], chunk_size=4096)
        snapshot = repo.snapshot(result.snapshot_id)
    keys = {name: entry.chunks[-1].key for name, entry in snapshot.tensors.items()}
    return store_path, result.snapshot_id.hex(), keys


def edit_chunks(store: Path, edit) -> None:
    env = lmdb.open(str(store), max_dbs=8)
    with env.begin(write=True) as txn:
        edit(txn, env.open_db(b"chunks", txn=txn))
    env.close()


def test_flipped_byte_is_named_by_verify(damaged, tmp_path: Path) -> None:
    store, snapshot_hex, keys = damaged
    key = keys["embed.weight"]

    def flip(txn, db):
        value = bytearray(txn.get(key, db=db))
        value[-1] ^= 0x01
        txn.put(key, bytes(value), db=db)

    edit_chunks(store, flip)
    result = cli("verify", "--deep", store)
    assert result.exit_code == 4
    damage_lines = [line for line in result.stdout.splitlines() if line.startswith("corrupt:")]
    assert len(damage_lines) == 1
    line = damage_lines[0]
    assert "'embed.weight'" in line and key.hex() in line and snapshot_hex[:12] in line
    assert "norm.weight" not in result.stdout

    out = tmp_path / "out.safetensors"
    export = cli("export", store, out)
    assert_one_line_error(export, "tensor 'embed.weight'", "is damaged", exit_code=4)
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors.partial*"))


def test_deleted_chunk_is_reported_missing(damaged) -> None:
    store, snapshot_hex, keys = damaged
    edit_chunks(store, lambda txn, db: txn.delete(keys["norm.weight"], db=db))
    report = cli("verify", store, "--json").json()
    assert not report["clean"]
    [damage] = report["damages"]
    assert damage["kind"] == "missing" and damage["tensor"] == "norm.weight"
    assert damage["chunk"] == keys["norm.weight"].hex() and damage["snapshot"] == snapshot_hex


def test_orphan_chunks_are_reported_but_clean(damaged) -> None:
    store, _, _ = damaged
    raw = b"left behind by an interrupted pack"
    edit_chunks(store, lambda txn, db: txn.put(chunk_key(raw), encode_chunk(Zstd(), memoryview(raw)), db=db))
    report = cli("verify", store, "--json").json()
    assert report["clean"] and report["orphans"] == [chunk_key(raw).hex()]
    assert cli("verify", store).exit_code == 0


def test_verify_of_one_snapshot(damaged) -> None:
    store, snapshot_hex, _ = damaged
    result = cli("verify", f"{store}@{snapshot_hex[:8]}", "--json").json()
    assert result["clean"] and result["snapshots"] == 1 and result["orphans"] == []


def _envelope(codec_id: str, params: dict, payload: bytes, framed: bool = False) -> bytes:
    """A stored chunk value as packs write it (framed) or as earlier packs did (one msgpack list)."""
    if framed:
        return framing.frame([codec_id, params], [payload])
    return msgpack.packb([codec_id, params, payload], use_bin_type=True)


def _planes(planes: list[tuple[int, bytes]], framed: bool) -> bytes:
    """A byte-group payload: framed (modes, then the planes) or an earlier pack's msgpack list."""
    if framed:
        return framing.frame([mode for mode, _ in planes], [plane for _, plane in planes])
    return msgpack.packb([list(plane) for plane in planes], use_bin_type=True)


def _hand_framed(header: bytes, parts: bytes, header_len: int | None = None) -> bytes:
    """A framed value built byte by byte, so its prefix can lie."""
    return struct.pack("<BI", 0xC1, len(header) if header_len is None else header_len) + header + parts


both_layouts = pytest.mark.parametrize("framed", [True, False], ids=["framed", "earlier-msgpack"])


@both_layouts
def test_decompression_bomb_is_refused_before_allocating(framed: bool) -> None:
    # 1 GiB of zeros compresses to ~40 KB; the manifest says the chunk holds 4 KiB.
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 30))
    stored = _envelope("zstd", {"level": 3}, bomb, framed)
    tracemalloc.start()
    with pytest.raises(ChunkCorrupt, match="declares 1073741824 bytes, manifest says 4096"):
        decode_chunk(b"\0" * 16, stored, 4096)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 << 20


@both_layouts
def test_bomb_inside_a_byte_group_plane_is_refused(framed: bool) -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 26))
    payload = _planes([(1, bomb), (0, b"\0" * 8)], framed)
    stored = _envelope("bytegroup+zstd", {"itemsize": 2, "level": 3}, payload, framed)
    with pytest.raises(ChunkCorrupt, match="declares 67108864 bytes"):
        decode_chunk(b"\0" * 16, stored, 16)


@both_layouts
def test_truncated_plane_frame_is_corrupt(framed: bool) -> None:
    plane = zstandard.ZstdCompressor().compress(bytes(range(256)) * 64)
    payload = _planes([(1, plane[:-6]), (0, b"\0" * (1 << 14))], framed)
    stored = _envelope("bytegroup+zstd", {"itemsize": 2, "level": 3}, payload, framed)
    with pytest.raises(ChunkCorrupt, match=r"decoded to|does not decode"):
        decode_chunk(b"\0" * 16, stored, 1 << 15)


def test_frame_without_content_size_or_with_a_huge_window_is_refused() -> None:
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100)
    with pytest.raises(ChunkCorrupt, match="declares"):
        decode_chunk(b"\0" * 16, _envelope("zstd", {"level": 3}, streamed), 100)
    params = zstandard.ZstdCompressionParameters(window_log=27, compression_level=3)
    wide = zstandard.ZstdCompressor(compression_params=params).compress(b"x" * 100)
    if zstandard.get_frame_parameters(wide).window_size > 1 << 20:  # zstd may shrink it for tiny inputs
        with pytest.raises(ChunkCorrupt, match="window"):
            decode_chunk(b"\0" * 16, _envelope("zstd", {"level": 3}, wide), 100)


@pytest.mark.parametrize(
    "stored",
    [
        b"not msgpack \xc1",
        msgpack.packb(["zstd", {"level": 3}]),
        msgpack.packb(["lzma", {}, b"x"]),
        msgpack.packb(["zstd", {"level": 3, "evil": 1}, b"x"]),
        msgpack.packb(["raw", {}, b"short"]),
        msgpack.packb(
            ["bytegroup+zstd", {"itemsize": 2, "level": 3}, msgpack.packb([[7, b"ab"], [0, b"ab"]])]
        ),
        b"\xc1",  # framed, but shorter than the frame prefix
        _hand_framed(msgpack.packb([["raw", {}], [4]]), b"abcd", header_len=0xFF),  # header overruns
        framing.frame(["raw", {}], [b"abcd"])[:-1],  # parts longer than the value
        framing.frame(["raw", {}], [b"abcd"]) + b"x",  # bytes beyond the parts
        framing.frame(["raw", {}], [b"ab", b"cd"]),  # an envelope has one part
        framing.frame(["raw"], [b"abcd"]),
        framing.frame(["raw", {}, "extra"], [b"abcd"]),
        _hand_framed(msgpack.packb([["raw", {}], [True]]), b"a"),  # a bool is no length
        framing.frame(["bytegroup+zstd", {"itemsize": 2, "level": 3}], [framing.frame([0], [b"abcd"])]),
        framing.frame(["bytegroup+zstd", {"itemsize": 2, "level": 3}], [framing.frame([0], [b"ab", b"cd"])]),
    ],
)
def test_malformed_chunk_values_are_corrupt_not_crashes(stored: bytes) -> None:
    with pytest.raises(ChunkCorrupt):
        decode_chunk(b"\0" * 16, stored, 4)


def test_chunk_that_decodes_to_other_bytes_is_corrupt() -> None:
    raw = bytes(range(64))
    stored = encode_chunk(ByteGroupZstd(itemsize=4), memoryview(raw))
    assert decode_chunk(chunk_key(raw), stored, 64) == raw
    with pytest.raises(ChunkCorrupt, match="do not hash to the chunk's key"):
        decode_chunk(chunk_key(raw[::-1]), stored, 64)


def _huffman_plane(data: bytes) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return packer.compress(data) + packer.flush()


@both_layouts
@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (_huffman_plane(bytes(1 << 20)), "exactly 8 bytes"),  # a Huffman bomb: 1 MiB where 8 are due
        (_huffman_plane(b"\1" * 4), "exactly 8 bytes"),  # too short
        (_huffman_plane(b"\1" * 8) + b"trailing", "exactly 8 bytes"),
        (b"\xff" * 12, "does not decode"),
    ],
)
def test_hostile_huffman_planes_are_corrupt(payload: bytes, fragment: str, framed: bool) -> None:
    planes = _planes([(2, payload), (0, b"\0" * 8)], framed)
    stored = _envelope("bytegroup+zstd", {"itemsize": 2, "level": 3}, planes, framed)
    with pytest.raises(ChunkCorrupt, match=fragment):
        decode_chunk(b"\0" * 16, stored, 16)


def test_exponent_plane_is_entropy_coded_and_the_sign_split_round_trips() -> None:
    values = np.random.default_rng(0).normal(0, 0.02, 1 << 16).astype(np.float32)
    values[::7] *= -1
    raw = values.tobytes()
    codec = ByteGroupZstd(itemsize=4, split_sign=True)
    stored = encode_chunk(codec, memoryview(raw))
    (codec_id, params), (payload,) = framing.unframe(stored)
    assert codec_id == codec.id and params == {"itemsize": 4, "level": 3, "split_sign": True}
    modes, planes = framing.unframe(payload)
    assert modes[:2] == [0, 0]  # the low mantissa bytes: raw
    exponent = planes[3]
    assert modes[3] == 1 and len(exponent) < 0.4 * len(raw) // 4  # zstd, Huffman-coded literals
    assert len(exponent) <= len(
        _huffman_plane(np.ascontiguousarray(np.frombuffer(raw, np.uint8)[3::4]).tobytes())
    )
    assert decode_chunk(chunk_key(raw), stored, len(raw)) == raw


def test_huffman_planes_of_earlier_packs_still_decode() -> None:
    raw = np.random.default_rng(1).normal(0, 0.02, 4096).astype(np.float32).tobytes()
    grid = np.frombuffer(raw, np.uint8).reshape(-1, 4)
    planes = [[0, grid[:, 0].tobytes()], [0, grid[:, 1].tobytes()], [0, grid[:, 2].tobytes()]]
    planes.append([2, _huffman_plane(grid[:, 3].tobytes())])
    stored = _envelope(
        "bytegroup+zstd", {"itemsize": 4, "level": 3}, msgpack.packb(planes, use_bin_type=True)
    )
    assert decode_chunk(chunk_key(raw), stored, len(raw)) == raw

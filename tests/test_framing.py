"""Framed values: the layout is pinned byte for byte, parts are views, and chunks of both layouts
(framed, and the plain msgpack of earlier packs) decode to the same bytes."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from blockstore.codecs import ByteGroupZstd, Raw, Zstd, framing
from blockstore.core.chunks import decode_chunk, encode_chunk
from blockstore.core.hashing import chunk_key


def test_layout_is_pinned() -> None:
    # 0xC1, header length 9 (u32 LE), msgpack [["raw", {}], [2]], then the part.
    expected = bytes.fromhex("c1 09000000 92 92 a3726177 80 91 02 6162")
    assert framing.frame(["raw", {}], [b"ab"]) == expected
    assert encode_chunk(Raw(), memoryview(b"ab")) == expected


def test_parts_are_views_of_the_value_not_copies() -> None:
    value = bytearray(framing.frame({"k": 1}, [b"first", b"", b"third"]))
    fields, parts = framing.unframe(memoryview(value))
    assert fields == {"k": 1} and [bytes(part) for part in parts] == [b"first", b"", b"third"]
    value[-1:] = b"D"
    assert bytes(parts[2]) == b"thirD"


def test_a_framed_value_is_never_valid_msgpack() -> None:
    with pytest.raises(msgpack.UnpackException):
        msgpack.unpackb(framing.frame([], []))
    assert not framing.is_framed(msgpack.packb(["raw", {}, b"ab"])) and not framing.is_framed(b"")


def _as_earlier_pack(value: bytes) -> bytes:
    """The same chunk in the layout earlier packs wrote: msgpack envelope, msgpack plane list."""
    (codec_id, params), (payload,) = framing.unframe(value)
    if codec_id == ByteGroupZstd.id:
        modes, planes = framing.unframe(payload)
        payload = msgpack.packb([[mode, bytes(plane)] for mode, plane in zip(modes, planes, strict=True)])
    return msgpack.packb([codec_id, params, bytes(payload)], use_bin_type=True)


@pytest.mark.parametrize(
    "codec", [Raw(), Zstd(), ByteGroupZstd(itemsize=2, split_sign=True), ByteGroupZstd(itemsize=4)]
)
def test_chunks_of_earlier_packs_decode_to_the_same_bytes(codec) -> None:
    raw = np.random.default_rng(2).normal(0, 0.02, 1 << 14).astype(np.float32).tobytes()
    value = encode_chunk(codec, memoryview(raw))
    assert framing.is_framed(value)
    assert decode_chunk(chunk_key(raw), value, len(raw)) == raw
    assert decode_chunk(chunk_key(raw), _as_earlier_pack(value), len(raw)) == raw

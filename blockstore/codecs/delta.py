"""The difference between a chunk and its base chunk, as bytes that compress far better than either.

A fine-tune moves every weight a little. Stored against the same chunk of its base model, the
small change is what is kept: each element of `width` bytes (little-endian, as safetensors stores
them) minus the base's element at the same place, modulo 2**(8*width), zigzag-folded so that small
changes either way become small unsigned numbers (0, -1, 1, -2 ... → 0, 1, 2, 3 ...). Most of them
then fit in four bits, and `Nibbles` codes them (`difference_codec`); where many do not (a float32
fine-tune moves most weights by thousands of units in the last place) byte grouping with zstd does
(`ByteGroupZstd`, at a level with matches: the high planes are almost all zero). Measured on
SmolLM2 bf16 with every weight moved by 1e-3 of its tensor's std, the byte-grouped difference is
0.21 of the plainly stored chunks against 0.23 for the XOR of the two (a step of one unit in the
last place flips many low bits of an XOR but is 1 as a difference) and 0.30 for the XOR under
plain zstd; nibbles take 0.75 of the byte-grouped difference and restore it three times faster.

Integer arithmetic on the bit patterns is exact for every dtype (floats included: it never
interprets them), so the round trip is lossless whatever the bytes are.
"""

from __future__ import annotations

import numpy as np

from blockstore.codecs.base import Codec, DecodeError
from blockstore.codecs.lossless import ByteGroupZstd
from blockstore.codecs.nibbles import ESCAPE, Difference, Nibbles

WIDTHS = (1, 2, 4, 8)
"""Element widths a difference is taken at (a dtype's byte-plane count: sub-byte dtypes use 1)."""

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def check_lengths(length: int, base_length: int, width: int) -> None:
    """Refuse a chunk and base that cannot be a delta of `width`-byte elements and its base."""
    if width not in WIDTHS:
        raise DecodeError(f"delta width {width} is not one of {', '.join(map(str, WIDTHS))}")
    if length != base_length:
        raise DecodeError(f"a chunk of {length} bytes cannot be a delta against a base of {base_length}")
    if length % width:
        raise DecodeError(f"{length} bytes is not a whole number of {width}-byte elements")


def difference(raw: memoryview | bytes, base: memoryview | bytes | bytearray, width: int) -> bytes:
    """zigzag(raw - base) element by element: what `restore` turns back into `raw`."""
    check_lengths(len(raw), len(base), width)
    unsigned, signed = _UNSIGNED[width], _SIGNED[width]
    change = (np.frombuffer(raw, unsigned) - np.frombuffer(base, unsigned)).view(signed)
    folded = (change << 1) ^ (change >> (8 * width - 1))
    return folded.view(unsigned).tobytes()


NIBBLES_AT_MOST = 1 / 8
"""Nibbles code a difference whose values are above 15 (exceptions) for at most this fraction of
its elements; beyond it every exception costs a nibble and a second stream on top of the value,
and byte planes code it as small and decode it faster."""


def difference_codec(folded: bytes, width: int, level: int) -> Codec:
    """The codec a delta stores the `difference` `folded` with: decided by the bytes alone, so a
    chunk packs to the same value in every store."""
    values = np.frombuffer(folded, _UNSIGNED[width])
    if np.count_nonzero(values > ESCAPE) <= NIBBLES_AT_MOST * len(values):
        return Nibbles(width, level)
    return ByteGroupZstd(width, level)


def decoded_difference(
    codec: Codec, payload: bytes | memoryview, out_len: int, width: int
) -> Difference | None:
    """A nibble-coded difference decoded ahead of its base, so that the base's reader can add it as
    it decodes the base (`Difference.add_onto`); None for a difference another codec stores, which
    `decode_onto` decodes once the base is there."""
    if isinstance(codec, Nibbles) and codec.width == width:
        return codec.difference(payload, out_len)
    return None


def decode_onto(
    codec: Codec,
    payload: bytes | memoryview,
    out: memoryview,
    base: memoryview | bytes | bytearray,
    width: int,
    difference: Difference | None = None,
) -> None:
    """Turn the stored difference into the bytes it was taken from, in `out`, given its base: a
    `decoded_difference` is added to `base` in the pass that unpacks it; another codec decodes
    first, then `restore`. `base` may be `out` itself (a base decoded into the delta's buffer):
    the sum is made in place."""
    check_lengths(len(out), len(base), width)
    if difference is not None:
        difference.add_onto(out, base)
        return
    if base is out:  # decoding the difference would overwrite the base
        base = bytes(out)
    codec.decode_into(payload, out)
    restore(out, base, width)


def restore(out: memoryview, base: memoryview | bytes | bytearray, width: int) -> None:
    """`out` holds a `difference`; turn it in place into the bytes it was taken from."""
    check_lengths(len(out), len(base), width)
    unsigned = _UNSIGNED[width]
    folded = np.frombuffer(out, unsigned)  # writable: `out` is
    sign = folded & 1
    np.negative(sign, out=sign)  # 0 or all ones (unsigned negation wraps)
    # In place, one temporary: this runs on every delta chunk a load decodes.
    np.right_shift(folded, 1, out=folded)
    np.bitwise_xor(folded, sign, out=folded)
    np.add(folded, np.frombuffer(base, unsigned), out=folded)

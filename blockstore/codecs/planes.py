"""Byte planes: an array of k-byte little-endian items seen as k arrays of single bytes.

Grouping byte `i` of every item into plane `i` puts a float's exponent bytes together, where
zstd finds structure, and its near-random mantissa bytes together, where nothing does. With
`split_sign`, the sign bit moves out of the top byte so that plane holds the 8 exponent bits
alone; the sign takes the top bit of the plane below, whose other 7 bits are the mantissa bits
just under the exponent.

Joining is on every load's path, so it is compiled (`blockstore.codecs._planes`, built at install): one
pass that writes each item once, with the GIL released. Where that module could not be built,
`join_numpy` gives the same bytes from numpy's whole-array shifts and masks, several times
slower (it makes a pass per plane). Splitting runs only when packing and stays in numpy.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

try:
    from blockstore.codecs import _planes as _compiled
except ImportError:  # not built at install (no C compiler): numpy joins to the same bytes
    _compiled = None  # type: ignore[assignment]  # mypy cannot type an optional module as "or None"

Buffer = bytes | bytearray | memoryview | np.ndarray
"""Anything holding one plane's bytes contiguously."""

ITEMSIZES = (1, 2, 4, 8)
"""Item widths with a numpy word; every byte-groupable safetensors dtype has one of them."""


_local = threading.local()
_BLOCK_BYTES = 1 << 20
"""Items are joined a block of this many bytes at a time, through a scratch buffer of the same size
kept per thread. A fresh buffer per chunk costs a page fault per 4 KiB (and numpy asks for huge
pages from 4 MB, which can stall on compaction), which can double the time to join a chunk inside
the runtime; a whole-chunk scratch, kept, would cost 4 MiB per decoding thread for little more."""


def _scratch() -> memoryview:
    if not hasattr(_local, "scratch"):
        _local.scratch = bytearray(_BLOCK_BYTES)
    return memoryview(_local.scratch)


def _words(buffer: memoryview, itemsize: int) -> np.ndarray:
    return np.frombuffer(buffer, dtype=np.dtype(f"<u{itemsize}"))


def split(raw: memoryview, itemsize: int, split_sign: bool) -> list[np.ndarray]:
    """The `itemsize` byte planes of `raw`, lowest byte first (len(raw) is a whole number of items).

    Each plane is one shift of the words cast straight into it: no temporary the size of the chunk,
    which numpy would ask huge pages for (chained temporaries made splitting about three times
    slower)."""
    words = _words(raw, itemsize)
    planes = [np.empty(len(words), np.uint8) for _ in range(itemsize)]
    for index, plane in enumerate(planes):
        np.right_shift(words, 8 * index, out=plane, casting="unsafe")
    if split_sign:
        top, below = planes[-1], planes[-2]  # sign + 7 exponent bits; 1 exponent bit + 7 mantissa bits
        np.bitwise_and(below, 0x7F, out=below)
        np.bitwise_and(top, 0x80, out=top)
        np.bitwise_or(below, top, out=below)  # the sign where the exponent's lowest bit was
        np.right_shift(words, 8 * itemsize - 9, out=top, casting="unsafe")  # the 8 exponent bits
    return planes


def join(planes: Sequence[Buffer], out: memoryview, split_sign: bool) -> None:
    """Write the items whose byte planes are `planes` (each len(out) / len(planes) bytes) into
    `out`: the inverse of `split`."""
    if _compiled is not None:
        _compiled.join(planes, out, split_sign)
    else:
        join_numpy(planes, out, split_sign)


def join_numpy(planes: Sequence[Buffer], out: memoryview, split_sign: bool) -> None:
    """`join` in numpy, a block of `_BLOCK_BYTES` at a time through a per-thread scratch."""
    arrays = [np.frombuffer(plane, dtype=np.uint8) for plane in planes]
    words = _words(out, len(arrays))
    scratch = _words(_scratch(), len(arrays))
    block = len(scratch)
    for start in range(0, len(words), block):
        part = words[start : start + block]
        parts = [plane[start : start + block] for plane in arrays]
        _join_block(parts, part, scratch[: len(part)], split_sign)


def _join_block(
    planes: Sequence[np.ndarray], words: np.ndarray, scratch: np.ndarray, split_sign: bool
) -> None:
    """Each plane is widened to a word, shifted into place and or-ed in: one or two passes each. The
    sign-carrying plane of `split_sign` is widened as a signed byte, so the widening itself copies
    the sign up to the item's top bit and a mask keeps it and the 7 mantissa bits."""
    itemsize = len(planes)
    signed = np.dtype(f"<i{itemsize}")
    top = 8 * itemsize
    for index, plane in enumerate(planes):
        term = words if index == 0 else scratch
        shift = 8 * index
        if split_sign and index == itemsize - 2:
            np.copyto(term.view(signed), plane.view(np.int8))
            if shift:
                np.left_shift(term, shift, out=term)
            np.bitwise_and(term, (1 << (top - 1)) | (0x7F << shift), out=term)
        else:
            if split_sign and index == itemsize - 1:
                shift = top - 9
            np.left_shift(plane, shift, out=term, dtype=words.dtype)
        if index:
            np.bitwise_or(words, term, out=words)

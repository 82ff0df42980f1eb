"""Framed values: a small msgpack header, then byte parts laid end to end, read without copying.

msgpack copies every `bin` it unpacks into a new bytes object. For a chunk of weights that meant
two copies of each plane (the chunk envelope, then the plane list) before decoding started, each
a fresh multi-megabyte allocation made while holding the GIL. A framed value keeps only the small
header in msgpack; its parts are slices (memoryviews) of the stored value itself, which the lazy
runtime reads straight from LMDB's memory map.

Layout: byte 0xC1, u32 little-endian header length H, H bytes of msgpack `[fields, part_lengths]`,
then the parts. 0xC1 is the one byte msgpack never uses, so a framed value cannot be mistaken for
the plain msgpack values earlier packs wrote (`is_framed`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import msgpack

MARK = 0xC1
_PREFIX = struct.Struct("<BI")


class FrameError(ValueError):
    """A framed value that does not parse; the caller names what it belonged to."""


PREFIX_LEN = 5
"""Bytes at the start of every framed value that say how long its header is (`header_len`)."""


def is_framed(value: bytes | memoryview) -> bool:
    """Whether `value` is framed (else it is an earlier pack's plain msgpack value)."""
    return len(value) > 0 and value[0] == MARK


def frame(fields: object, parts: Sequence[bytes | memoryview]) -> bytes:
    """`fields` (anything msgpack encodes) and `parts`, framed."""
    header = msgpack.packb([fields, [len(part) for part in parts]], use_bin_type=True)
    return b"".join([_PREFIX.pack(MARK, len(header)), header, *parts])


def header_len(prefix: bytes | memoryview) -> int:
    """The length of the start of a framed value that holds its fields (`fields_of` reads them),
    from its first `PREFIX_LEN` bytes."""
    if len(prefix) < _PREFIX.size:
        raise FrameError(f"framed value of {len(prefix)} bytes is shorter than its prefix")
    mark, length = _PREFIX.unpack_from(prefix)
    if mark != MARK:
        raise FrameError("not a framed value")
    return _PREFIX.size + length


def _header(view: memoryview) -> tuple[list[object], int]:
    """(the parsed header `[fields, part lengths]`, the offset where the parts start) of the framed
    value `view` begins."""
    body = header_len(view)
    if body > len(view):
        raise FrameError(f"frame header of {body - _PREFIX.size} bytes overruns a {len(view)}-byte value")
    try:
        header = msgpack.unpackb(view[_PREFIX.size : body], use_list=True, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise FrameError(f"frame header does not parse ({exc})") from None
    if not (isinstance(header, list) and len(header) == 2):
        raise FrameError("frame header is not [fields, part lengths]")
    return header, body


def fields_of(start: bytes | memoryview) -> object:
    """The fields of a framed value from its start alone (`header_len` bytes of it): enough to
    tell what a stored chunk is without reading its payload."""
    return _header(memoryview(start).cast("B"))[0][0]


def unframe(value: bytes | memoryview) -> tuple[object, list[memoryview]]:
    """(fields, parts) of a framed value; the parts are views into `value`, not copies."""
    view = memoryview(value).cast("B")
    header, body = _header(view)
    fields, lengths = header
    if not isinstance(lengths, list):
        raise FrameError("frame header is not [fields, part lengths]")
    if not all(type(length) is int and length >= 0 for length in lengths):
        raise FrameError("frame part lengths are not all non-negative integers")
    if body + sum(lengths) != len(view):
        raise FrameError(f"frame parts add up to {body + sum(lengths)} bytes, the value has {len(view)}")
    parts = []
    for length in lengths:
        parts.append(view[body : body + length])
        body += length
    return fields, parts


def framed_len(fields: object, part_lengths: Sequence[int]) -> int:
    """Length of `frame(fields, parts)` for parts of these lengths, without the parts."""
    header = msgpack.packb([fields, list(part_lengths)], use_bin_type=True)
    return _PREFIX.size + len(header) + sum(part_lengths)

"""Small unsigned integers, mostly zero, the rest four bits each where they fit: a fine-tune's differences.

A delta chunk's difference (`delta.difference`) is three quarters zeros, then mostly 1 or 2, a few
larger values, and rarely one that needs its whole width. Byte planes code the low plane of such values
one Huffman symbol per element (never below a bit each, though the values carry about 1.6) and
decode at the speed of zstd's literal decoder. Here a bitmap says which elements are not 0, and each
of those takes a nibble, `min(value - 1, 15)`; a nibble of 15 marks an *exception*, kept as
`value - 16` in its full width. The bitmap and the nibbles are zstd frames (Huffman-coded bytes: the
bitmap's bits are about a quarter ones, the nibbles' values mostly 0 and 1), a bit and a quarter of a
byte per element before zstd. Measured on SmolLM2 bf16 moved by 1e-3 of each tensor's std, the
difference takes 0.72 of its byte-plane size, and a zero costs one bit to decode: zstd decodes a
quarter of the bytes it did when every element had a nibble, and the exceptions are looked for among
a quarter of the elements.

The payload is one framed value (`framing`): fields `[nonzero_count, exception_count]`, parts
`[bitmap, nibbles, exceptions]`: the bitmap one zstd frame of `ceil(n / 8)` bytes (element i is bit
i % 8 of byte i // 8; the padding bits are 0), the nibbles one zstd frame of `ceil(nonzero_count / 2)`
bytes (the k-th nonzero element's in the low nibble of byte k // 2 when k is even, the high one when
odd; an odd count's last high nibble is 0), the exceptions a `bytegroup+zstd` payload of
`exception_count * width` bytes (empty when there are none).

Unpacking runs on every delta chunk a load decodes, so it is compiled (`_planes.nibbles`, which also
adds the unpacked difference to a base chunk in the same pass, `restore_into`); where the module was
not built numpy gives the same bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from blockstore.codecs import framing, planes
from blockstore.codecs.base import LOSSLESS, DecodeError
from blockstore.codecs.lossless import (
    _KEPT_SCRATCH,
    ByteGroupZstd,
    _check_level,
    _compressor,
    zstd_decompress_into,
)
from blockstore.errors import InvalidArgument

ESCAPE = 15
"""The nibble of an element whose value is an exception (the value is `ESCAPE + 1` plus the exception)."""

WIDTHS = (1, 2, 4, 8)
"""Element widths, in bytes: those with a numpy word."""

BITMAP_LEVEL = -1
"""The bitmap's zstd level: a negative one keeps its bytes as they are (zstd does not Huffman-code
literals at negative levels) and still codes runs, such as a stretch of unchanged elements. A fine-
tune's bitmap is about a quarter ones, which Huffman coding shrinks by a fifth (an eighth of the
difference) but decodes at the cost of the nibbles themselves; raw, it decodes as a copy."""

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_local = threading.local()


@dataclass(frozen=True)
class Nibbles:
    """Unsigned `width`-byte little-endian integers, mostly 0 and small (see the module)."""

    id: ClassVar[str] = "nibbles+zstd"
    tier: ClassVar[str] = LOSSLESS
    width: int = 2
    level: int = 3
    """The zstd level of the bitmap, the nibbles and the exceptions: their bytes are near-random
    symbols, which every level codes alike, so a low one packs fast."""

    def __post_init__(self) -> None:
        _check_level(self.level)
        if self.width not in WIDTHS:
            raise InvalidArgument(f"nibbles width {self.width} is not one of {', '.join(map(str, WIDTHS))}")

    def encode(self, raw: memoryview) -> bytes:
        if len(raw) % self.width:
            raise InvalidArgument(f"{len(raw)} bytes is not a whole number of {self.width}-byte elements")
        values = np.frombuffer(raw, _UNSIGNED[self.width])
        present = values != 0
        nonzero = values[present]
        small = np.minimum(nonzero - 1, ESCAPE).astype(np.uint8)
        if len(small) % 2:
            small = np.append(small, np.uint8(0))
        packed = small[0::2] | (small[1::2] << 4)
        exceptions = nonzero[nonzero > ESCAPE] - (ESCAPE + 1)
        exceptions_payload = (
            ByteGroupZstd(self.width, self.level).encode(memoryview(exceptions.tobytes()))
            if len(exceptions)
            else b""
        )
        bitmap = np.packbits(present, bitorder="little").tobytes()
        return framing.frame(
            [len(nonzero), len(exceptions)],
            [
                _compressor(BITMAP_LEVEL).compress(bitmap),
                _compressor(self.level).compress(packed.tobytes()),
                exceptions_payload,
            ],
        )

    def decode_into(self, data: bytes | memoryview, out: memoryview) -> None:
        self.restore_into(data, out, None)

    def restore_into(
        self, data: bytes | memoryview, out: memoryview, base: bytes | bytearray | memoryview | None
    ) -> None:
        """Decode into `out`; with `base` (as long as `out`, or `out` itself), write base +
        unzigzag(value) for each element instead of the value: a delta chunk's bytes, in the pass
        that unpacks them."""
        self.difference(data, len(out)).add_onto(out, base)

    def difference(self, data: bytes | memoryview, out_len: int) -> Difference:
        """The decoded parts of `data`, for `out_len` bytes, ready to be added onto a base."""
        if out_len % self.width:
            raise DecodeError(f"{out_len} bytes is not a whole number of {self.width}-byte elements")
        return self._parts(data, out_len // self.width)

    def _parts(self, data: bytes | memoryview, count: int) -> Difference:
        try:
            fields, parts = framing.unframe(data)
        except framing.FrameError as exc:
            raise DecodeError(f"nibbles payload: {exc}") from None
        if not (
            isinstance(fields, list)
            and len(fields) == 2
            and all(type(field) is int for field in fields)
            and len(parts) == 3
        ):
            raise DecodeError(
                "nibbles payload is not [nonzero count, exception count]"
                " with a bitmap, nibbles and exceptions"
            )
        nonzero, exception_count = fields
        if not 0 <= nonzero <= count:
            raise DecodeError(f"nibbles payload declares {nonzero} nonzero values for {count} elements")
        if not 0 <= exception_count <= nonzero:
            raise DecodeError(
                f"nibbles payload declares {exception_count} exceptions for {nonzero} nonzero values"
            )
        difference = Difference(
            self.width, nonzero, (count + 7) // 8, (nonzero + 1) // 2, exception_count * self.width
        )
        try:
            zstd_decompress_into(parts[0], difference.bitmap)
            zstd_decompress_into(parts[1], difference.packed)
            if exception_count:
                ByteGroupZstd(self.width, self.level).decode_into(parts[2], difference.exceptions)
            elif len(parts[2]):
                raise DecodeError("nibbles payload holds exceptions it does not count")
        except BaseException:
            difference.give_back()
            raise
        return difference


Base = bytes | bytearray | memoryview | tuple[Sequence[bytes | memoryview], bool] | None
"""What a difference is added onto: nothing (the values themselves), a base's bytes (or the output
buffer already holding them), or a base's byte planes and `split_sign`, joined block by block."""

_PARTS = ("bitmap", "packed", "exceptions")


class Difference:
    """A `Nibbles` payload decoded into its parts, to be written out once with `add_onto`.

    The parts live in buffers kept per thread, taken while the difference waits for its base: a
    chunk decoded meanwhile on the same thread (the base itself, or a copy reading a base that is
    a delta in its store) gets buffers of its own. `add_onto` gives them back."""

    def __init__(
        self, width: int, nonzero: int, bitmap_len: int, packed_len: int, exceptions_len: int
    ) -> None:
        self.width = width
        self.nonzero = nonzero
        lengths = (bitmap_len, packed_len, exceptions_len)
        self._buffers = [(name, _take(name, length)) for name, length in zip(_PARTS, lengths, strict=True)]
        self.bitmap, self.packed, self.exceptions = (
            memoryview(buffer)[:length] for (_, buffer), length in zip(self._buffers, lengths, strict=True)
        )

    def add_onto(self, out: memoryview, base: Base) -> None:
        """Write into `out` the values (base None) or base + unzigzag(value), element by element.
        Given as byte planes, the base is joined into `out` a block at a time just before the
        difference is added, so it is never written out whole and read back (the pass of a delta
        chunk whose base is stored byte-grouped, as float weights are)."""
        try:
            self._write(out, base)
        finally:
            self.give_back()

    def give_back(self) -> None:
        """Return the parts' buffers to this thread (after `add_onto`, or when decoding failed)."""
        for name, buffer in self._buffers:
            _give_back(name, buffer)
        self._buffers = []

    def _write(self, out: memoryview, base: Base) -> None:
        if not self._buffers:
            raise RuntimeError("a difference is added onto its base once")
        if planes._compiled is not None:
            try:
                planes._compiled.nibbles(
                    self.bitmap, self.packed, self.nonzero, self.exceptions, out, self.width, base
                )
            except ValueError as exc:
                raise DecodeError(f"nibbles payload: {exc}") from None
            return
        if isinstance(base, tuple):
            base_planes, split_sign = base
            if len(base_planes) != self.width:
                raise DecodeError(
                    f"nibbles payload: {len(base_planes)} base planes for {self.width}-byte elements"
                )
            joined = memoryview(bytearray(len(out)))
            planes.join_numpy(base_planes, joined, split_sign)
            base = joined
        _unpack_numpy(self, out, base)


def _take(name: str, nbytes: int) -> bytearray:
    """This thread's kept buffer for one part (a chunk's bitmap is an eighth of its elements), taken, or
    a new one: decoding is on every load's path, and a fresh buffer per chunk pays a page fault
    per 4 KiB."""
    kept = _local.__dict__.pop(name, None)
    if kept is None or len(kept) < nbytes:
        kept = bytearray(max(nbytes, 1 << 16))
    return kept


def _give_back(name: str, buffer: bytearray) -> None:
    """Keep `buffer` for this thread's next part, unless it is larger than byte planes keep
    (`_KEPT_SCRATCH`): no thread holds on to a huge buffer."""
    if len(buffer) <= _KEPT_SCRATCH:
        _local.__dict__[name] = buffer


def _unpack_numpy(
    difference: Difference, out: memoryview, base: bytes | bytearray | memoryview | None
) -> None:
    """`_planes.nibbles` in numpy: the same bytes and the same refusals, more slowly."""
    width = difference.width
    unsigned = _UNSIGNED[width]
    count = len(out) // width
    present = np.unpackbits(np.frombuffer(difference.bitmap, np.uint8), bitorder="little").astype(bool)
    if present[count:].any():
        raise DecodeError("nibbles payload: the bitmap marks elements past the last one")
    present = present[:count]
    nibbles = np.frombuffer(difference.packed, np.uint8)
    if difference.nonzero % 2 and nibbles[-1] >> 4:
        raise DecodeError("nibbles payload: the padding nibble after the last value is not 0")
    if int(np.count_nonzero(present)) != difference.nonzero:
        raise DecodeError(
            "nibbles payload: the bitmap does not mark exactly the"
            f" {difference.nonzero} nonzero values packed"
        )
    small = np.empty(2 * len(nibbles), np.uint8)
    small[0::2] = nibbles & 15
    small[1::2] = nibbles >> 4
    small = small[: difference.nonzero]
    marked = small == ESCAPE
    extra = np.frombuffer(difference.exceptions, unsigned)
    if int(np.count_nonzero(marked)) != len(extra):
        raise DecodeError(
            f"nibbles payload: the packed values do not mark exactly the {len(extra)} exceptions given"
        )
    nonzero = small.astype(unsigned) + unsigned(1)
    nonzero[marked] += extra  # wraps modulo 2**(8*width), as the compiled pass does
    values = np.zeros(count, unsigned)
    values[present] = nonzero
    if base is not None:
        if len(base) != len(out):
            raise DecodeError(f"nibbles payload: a base of {len(base)} bytes for {len(out)} output bytes")
        sign = (values & 1).astype(unsigned)
        np.negative(sign, out=sign)
        values = ((values >> 1) ^ sign) + np.frombuffer(base, unsigned)
    np.frombuffer(out, unsigned)[:] = values

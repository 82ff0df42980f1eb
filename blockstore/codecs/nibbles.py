"""Small unsigned integers, four bits each where they fit: the codec of a fine-tune's differences.

A delta chunk's difference (`delta.difference`) is mostly 0, 1 or 2 per element, a few larger
values, and rarely one that needs its whole width. Byte planes code the low plane of such values
one Huffman symbol per element (never below a bit each, though the values carry about 1.5) and
decode at the speed of zstd's literal decoder. Here each element takes a nibble (`min(value, 15)`,
two to a byte, element 2k in the low nibble of byte k) and every value of 15 or more is also an
*exception*, kept as `value - 15` in its full width. The packed nibbles are half as many symbols,
and pairs of small values repeat, so zstd's optimal parser codes them close to their entropy and
decodes them mostly as copies: measured on SmolLM2 bf16 moved by 1e-3 of each tensor's std,
a difference takes 0.75 of its byte-plane size and decodes in about a third of the time.

The payload is one framed value (`framing`): fields `[exception_count]`, parts `[nibbles, exceptions]`,
the nibbles one zstd frame of `ceil(n / 2)` bytes (an odd count's last high nibble is 0) and the
exceptions a `bytegroup+zstd` payload of `exception_count * width` bytes (empty when there are none).

Unpacking runs on every delta chunk a load decodes, so it is compiled (`_planes.nibbles`, which can
also add the unpacked difference to a base chunk in the same pass, `restore_into`); where the module
was not built numpy gives the same bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import zstandard

from blockstore.codecs import framing, planes
from blockstore.codecs.base import LOSSLESS, DecodeError
from blockstore.codecs.lossless import _KEPT_SCRATCH, ByteGroupZstd, _check_level, zstd_decompress_into
from blockstore.errors import InvalidArgument

ESCAPE = 15
"""The nibble of an element whose value is an exception (it is `ESCAPE` plus the exception)."""

WIDTHS = (1, 2, 4, 8)
"""Element widths, in bytes: those with a numpy word."""

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_local = threading.local()


def _nibble_compressor() -> zstandard.ZstdCompressor:
    """zstd's optimal parser with the shortest search it has: on packed differences it finds the
    repeats of small-value pairs that make the nibbles decode largely as copies (6 % smaller than
    Huffman-coded literals alone and decoded in 0.6 of their time), for a third of what level 19's
    search costs and the same size."""
    if not hasattr(_local, "nibble_compressor"):
        params = zstandard.ZstdCompressionParameters(
            strategy=zstandard.STRATEGY_BTOPT,
            window_log=17,
            chain_log=16,
            hash_log=16,
            search_log=1,
            min_match=4,
            target_length=16,
            write_content_size=True,
        )
        _local.nibble_compressor = zstandard.ZstdCompressor(compression_params=params)
    return _local.nibble_compressor


@dataclass(frozen=True)
class Nibbles:
    """Unsigned `width`-byte little-endian integers, small ones a nibble each (see the module)."""

    id: ClassVar[str] = "nibbles+zstd"
    tier: ClassVar[str] = LOSSLESS
    width: int = 2
    level: int = 3
    """The zstd level of the exceptions (the nibbles always take the optimal parser)."""

    def __post_init__(self) -> None:
        _check_level(self.level)
        if self.width not in WIDTHS:
            raise InvalidArgument(f"nibbles width {self.width} is not one of {', '.join(map(str, WIDTHS))}")

    def encode(self, raw: memoryview) -> bytes:
        if len(raw) % self.width:
            raise InvalidArgument(f"{len(raw)} bytes is not a whole number of {self.width}-byte elements")
        values = np.frombuffer(raw, _UNSIGNED[self.width])
        small = np.minimum(values, ESCAPE).astype(np.uint8)
        if len(small) % 2:
            small = np.append(small, np.uint8(0))
        packed = small[0::2] | (small[1::2] << 4)
        exceptions = values[values >= ESCAPE] - ESCAPE
        exceptions_payload = (
            ByteGroupZstd(self.width, self.level).encode(memoryview(exceptions.tobytes()))
            if len(exceptions)
            else b""
        )
        return framing.frame(
            [len(exceptions)], [_nibble_compressor().compress(packed.tobytes()), exceptions_payload]
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
        if not (isinstance(fields, list) and len(fields) == 1 and type(fields[0]) is int and len(parts) == 2):
            raise DecodeError("nibbles payload is not [exception count] with nibbles and exceptions")
        exception_count = fields[0]
        if not 0 <= exception_count <= count:
            raise DecodeError(f"nibbles payload declares {exception_count} exceptions for {count} elements")
        difference = Difference(self.width, (count + 1) // 2, exception_count * self.width)
        zstd_decompress_into(parts[0], difference.packed)
        if exception_count:
            ByteGroupZstd(self.width, self.level).decode_into(parts[1], difference.exceptions)
        elif len(parts[1]):
            raise DecodeError("nibbles payload holds exceptions it does not count")
        return difference


Base = bytes | bytearray | memoryview | tuple[Sequence[bytes | memoryview], bool] | None
"""What a difference is added onto: nothing (the values themselves), a base's bytes (or the output
buffer already holding them), or a base's byte planes and `split_sign`, joined block by block."""


class Difference:
    """A `Nibbles` payload decoded into its parts, to be written out once with `add_onto`.

    The parts live in buffers kept per thread, taken while the difference waits for its base: a
    chunk decoded meanwhile on the same thread (the base itself, or a copy reading a base that is
    a delta in its store) gets buffers of its own. `add_onto` gives them back."""

    def __init__(self, width: int, packed_len: int, exceptions_len: int) -> None:
        self.width = width
        self._buffers = [
            ("packed", _take("packed", packed_len)),
            ("exceptions", _take("exceptions", exceptions_len)),
        ]
        self.packed = memoryview(self._buffers[0][1])[:packed_len]
        self.exceptions = memoryview(self._buffers[1][1])[:exceptions_len]

    def add_onto(self, out: memoryview, base: Base) -> None:
        """Write into `out` the values (base None) or base + unzigzag(value), element by element.
        Given as byte planes, the base is joined into `out` a block at a time just before the
        difference is added, so it is never written out whole and read back (the pass of a delta
        chunk whose base is stored byte-grouped, as float weights are)."""
        try:
            self._write(out, base)
        finally:
            for name, buffer in self._buffers:
                _give_back(name, buffer)
            self._buffers = []

    def _write(self, out: memoryview, base: Base) -> None:
        if not self._buffers:
            raise RuntimeError("a difference is added onto its base once")
        if planes._compiled is not None:
            try:
                planes._compiled.nibbles(self.packed, self.exceptions, out, self.width, base)
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
        _unpack_numpy(self.packed, self.exceptions, out, self.width, base)


def _take(name: str, nbytes: int) -> bytearray:
    """This thread's kept buffer for one part (a chunk's nibbles are half its elements), taken, or
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
    packed: memoryview,
    exceptions: memoryview,
    out: memoryview,
    width: int,
    base: bytes | bytearray | memoryview | None,
) -> None:
    """`_planes.nibbles` in numpy: the same bytes and the same refusals, more slowly."""
    unsigned = _UNSIGNED[width]
    count = len(out) // width
    nibbles = np.frombuffer(packed, np.uint8)
    if count % 2 and nibbles[-1] >> 4:
        raise DecodeError("nibbles payload: the padding nibble after the last element is not 0")
    small = np.empty(2 * len(nibbles), np.uint8)
    small[0::2] = nibbles & 15
    small[1::2] = nibbles >> 4
    small = small[:count]
    marked = small == ESCAPE
    extra = np.frombuffer(exceptions, unsigned)
    if int(np.count_nonzero(marked)) != len(extra):
        raise DecodeError(
            f"nibbles payload: the packed values do not mark exactly the {len(extra)} exceptions given"
        )
    values = small.astype(unsigned)
    values[marked] += extra  # wraps modulo 2**(8*width), as the compiled pass does
    if base is not None:
        if len(base) != len(out):
            raise DecodeError(f"nibbles payload: a base of {len(base)} bytes for {len(out)} output bytes")
        sign = (values & 1).astype(unsigned)
        np.negative(sign, out=sign)
        values = ((values >> 1) ^ sign) + np.frombuffer(base, unsigned)
    np.frombuffer(out, unsigned)[:] = values

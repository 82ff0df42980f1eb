"""The lossless codecs: raw bytes, plain zstd, and byte planes with zstd (see `planes`, `framing`).

Every codec here gives back exactly the bytes it encoded (`tier` LOSSLESS). `decode_into` checks
sizes before it writes, and zstd frames are checked for their declared content size and window
before any decompression, so a hostile chunk cannot make the decoder allocate more than the
manifest says the chunk holds.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from typing import ClassVar

import msgpack
import zstandard

from blockstore.codecs import framing, planes
from blockstore.codecs.base import LOSSLESS, DecodeError
from blockstore.errors import InvalidArgument

# A frame may declare a window up to this much larger than its content (zstd rounds windows up to
# a power of two); anything beyond is refused as a decompression bomb.
_WINDOW_SLACK = 2
_MIN_WINDOW = 1 << 20


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """A per-thread compressor: python-zstandard contexts are not thread-safe."""
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def zstd_decompress_into(frame: bytes | memoryview, out: memoryview) -> None:
    """Decompress one zstd frame that must hold exactly `len(out)` bytes straight into `out`.

    The frame header is checked first: its declared content size must equal `len(out)` and its
    window must be proportionate, so a bomb is refused before anything is allocated. Writing into
    the caller's memory, not a new bytes object, spares a multi-megabyte allocation per plane: with
    several decoding threads glibc serves those from fresh mmaps, and their page faults and unmaps
    can make two threads slower than one.
    """
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"bad zstd frame header ({exc})") from None
    if params.content_size != len(out):
        raise DecodeError(f"zstd frame declares {params.content_size} bytes, manifest says {len(out)}")
    if params.window_size > max(_MIN_WINDOW, _WINDOW_SLACK * len(out)):
        raise DecodeError(f"zstd frame asks for a {params.window_size}-byte window")
    filled = 0
    try:
        with _decompressor().stream_reader(frame, read_size=max(1, len(frame))) as reader:
            while filled < len(out):
                count = reader.readinto(out[filled:])
                if not count:
                    break
                filled += count
    except zstandard.ZstdError as exc:
        raise DecodeError(f"zstd data does not decode ({exc})") from None
    if filled != len(out):
        raise DecodeError(f"zstd frame decoded to {filled} bytes, expected {len(out)}")


def zstd_decompress_exact(frame: bytes | memoryview, expected_len: int) -> bytearray:
    """`zstd_decompress_into` a new buffer of `expected_len` bytes."""
    out = bytearray(expected_len)
    zstd_decompress_into(frame, memoryview(out))
    return out


_MIN_LEVEL = -7  # zstd's fast negative levels; below this they buy nothing for weights


def _check_level(level: int) -> None:
    if not _MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise InvalidArgument(
            f"zstd level {level} is outside {_MIN_LEVEL}..{zstandard.MAX_COMPRESSION_LEVEL}"
        )


@dataclass(frozen=True)
class Raw:
    """Bytes stored as they are: the fallback for chunks that do not compress."""

    id: ClassVar[str] = "raw"
    tier: ClassVar[str] = LOSSLESS

    def encode(self, raw: memoryview) -> bytes:
        return bytes(raw)

    def decode_into(self, data: bytes | memoryview, out: memoryview) -> None:
        if len(data) != len(out):
            raise DecodeError(f"raw chunk holds {len(data)} bytes, expected {len(out)}")
        out[:] = data


@dataclass(frozen=True)
class Zstd:
    """Plain zstd over the chunk's bytes."""

    id: ClassVar[str] = "zstd"
    tier: ClassVar[str] = LOSSLESS
    level: int = 3

    def __post_init__(self) -> None:
        _check_level(self.level)

    def encode(self, raw: memoryview) -> bytes:
        return _compressor(self.level).compress(raw)

    def decode_into(self, data: bytes | memoryview, out: memoryview) -> None:
        zstd_decompress_into(data, out)


_PLANE_RAW = 0
_PLANE_ZSTD = 1
_PLANE_HUFFMAN = 2
"""Raw deflate, Huffman only: what early packs chose for exponent planes. Still decoded; no longer
written, since zstd's Huffman-coded literals match its size and decode several times faster."""
_NOISE = 0.97  # a plane the entropy pass shrinks by less than 3% is stored raw


def _plane_compressor(level: int) -> zstandard.ZstdCompressor:
    """zstd for one byte plane: min_match 7 and a 128 KiB window find the few real repeats in a
    plane of integers or other structured bytes without paying match costs on noise (measured on
    MiniLM; docs/design.md §5)."""
    cache = _local.__dict__.setdefault("plane_compressors", {})
    if level not in cache:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, min_match=7, window_log=17, write_content_size=True
        )
        cache[level] = zstandard.ZstdCompressor(compression_params=params)
    return cache[level]


def _entropy_compressor() -> zstandard.ZstdCompressor:
    """zstd reduced to its entropy coder: the fast strategy with the smallest hash table (64
    entries) finds almost no matches, so a plane becomes Huffman-coded literals (zstd's huff0, four
    streams) plus the rare long run. On a float exponent plane that is as small as zstd's optimal
    parser (which earlier packs ran, at a twentieth of the speed: it searched for matches a float
    exponent plane does not have) and decodes the same way. `target_length` must stay 0: above it
    zstd treats the level as negative and stops compressing literals."""
    if not hasattr(_local, "entropy_compressor"):
        params = zstandard.ZstdCompressionParameters(
            window_log=17,
            min_match=7,
            strategy=zstandard.STRATEGY_FAST,
            hash_log=6,
            target_length=0,
            write_content_size=True,
        )
        _local.entropy_compressor = zstandard.ZstdCompressor(compression_params=params)
    return _local.entropy_compressor


def _unhuffman(payload: bytes | memoryview, expected_len: int) -> bytes:
    unpacker = zlib.decompressobj(-15)
    try:
        data = unpacker.decompress(payload, expected_len)
    except zlib.error as exc:
        raise DecodeError(f"huffman plane does not decode ({exc})") from None
    if len(data) != expected_len or not unpacker.eof or unpacker.unconsumed_tail or unpacker.unused_data:
        raise DecodeError(f"huffman plane does not hold exactly {expected_len} bytes")
    return data


@dataclass(frozen=True)
class ByteGroupZstd:
    """Split each element's bytes into planes, then store each plane raw or as zstd (reduced to
    Huffman-coded literals; for planes that are not a float's, also at `level` with matches),
    whichever is smallest.

    Floating-point weights put their exponent in one byte of each element (after `split_sign` moves
    the sign bit out of it): grouped together those bytes compress well, while mantissa bytes are
    near-random and are stored raw, which also makes decoding them a copy.
    """

    id: ClassVar[str] = "bytegroup+zstd"
    tier: ClassVar[str] = LOSSLESS
    itemsize: int = 1
    level: int = 3
    split_sign: bool = False

    def __post_init__(self) -> None:
        _check_level(self.level)
        if self.itemsize not in planes.ITEMSIZES:
            raise InvalidArgument(
                f"byte-group itemsize {self.itemsize} is not one of {', '.join(map(str, planes.ITEMSIZES))}"
            )
        if self.split_sign and self.itemsize < 2:
            raise InvalidArgument("split_sign needs items of 2 bytes or more")

    def encode(self, raw: memoryview) -> bytes:
        if len(raw) % self.itemsize:
            raise InvalidArgument(f"{len(raw)} bytes is not a whole number of {self.itemsize}-byte items")
        modes, stored = [], []
        for byte_plane in planes.split(raw, self.itemsize, self.split_sign):
            plane = byte_plane.data
            candidates: list[tuple[int, bytes | memoryview]] = [(_PLANE_RAW, plane)]
            literals = _entropy_compressor().compress(plane)
            if len(literals) < _NOISE * len(plane):  # else a mantissa plane: no coder will pay
                candidates.append((_PLANE_ZSTD, literals))
                if not self.split_sign:  # integers and other bytes may repeat; float planes do not
                    candidates.append((_PLANE_ZSTD, _plane_compressor(self.level).compress(plane)))
            mode, payload = min(candidates, key=lambda candidate: len(candidate[1]))
            modes.append(mode)
            stored.append(payload)
        return framing.frame(modes, stored)

    def decode_into(self, data: bytes | memoryview, out: memoryview) -> None:
        planes.join(self.decoded_planes(data, len(out)), out, self.split_sign)

    def decoded_planes(self, data: bytes | memoryview, out_len: int) -> list[bytes | memoryview]:
        """The byte planes of the `out_len` bytes `data` decodes to, not yet joined (a delta adds
        its difference as it joins its base's planes: `Difference.add_onto`). Views of the stored
        value or of a per-thread scratch: valid until this thread decodes the next chunk."""
        if out_len % self.itemsize:
            raise DecodeError(f"{out_len} bytes is not a whole number of {self.itemsize}-byte items")
        plane_len = out_len // self.itemsize
        stored = _stored_planes(data)
        if len(stored) != self.itemsize:
            raise DecodeError(f"byte-group payload holds {len(stored)} planes, not {self.itemsize}")
        scratch = _plane_scratch(plane_len * sum(mode == _PLANE_ZSTD for mode, _ in stored))
        byte_planes: list[bytes | memoryview] = []
        for index, (mode, payload) in enumerate(stored):
            if mode == _PLANE_ZSTD:
                plane, scratch = scratch[:plane_len], scratch[plane_len:]
                zstd_decompress_into(payload, plane)
                payload = plane
            elif mode == _PLANE_HUFFMAN:
                payload = _unhuffman(payload, plane_len)
            elif mode != _PLANE_RAW or len(payload) != plane_len:
                raise DecodeError(f"byte-group plane {index} has mode {mode!r}, {len(payload)} bytes")
            byte_planes.append(payload)
        return byte_planes


def _stored_planes(data: bytes | memoryview) -> list[tuple[object, bytes | memoryview]]:
    """(mode, payload) of each plane, from a framed payload or an earlier pack's msgpack list."""
    if framing.is_framed(data):
        try:
            modes, payloads = framing.unframe(data)
        except framing.FrameError as exc:
            raise DecodeError(f"byte-group payload: {exc}") from None
        if not (isinstance(modes, list) and len(modes) == len(payloads)):
            raise DecodeError("byte-group payload does not give one mode per plane")
        return list(zip(modes, payloads, strict=True))
    try:
        stored = msgpack.unpackb(data, use_list=True, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise DecodeError(f"byte-group payload does not parse ({exc})") from None
    if not isinstance(stored, list):
        raise DecodeError("byte-group payload is not a list of planes")
    for index, plane in enumerate(stored):
        if not (isinstance(plane, list) and len(plane) == 2 and isinstance(plane[1], bytes)):
            raise DecodeError(f"byte-group plane {index} is malformed")
    return [(mode, payload) for mode, payload in stored]


_KEPT_SCRATCH = 8 << 20
"""Decoded planes of up to this many bytes per chunk go through a buffer kept per thread (a 4 MiB
chunk needs at most 4 MiB; usually its one or two exponent planes); larger chunks get a new one."""


def _plane_scratch(nbytes: int) -> memoryview:
    if nbytes > _KEPT_SCRATCH:
        return memoryview(bytearray(nbytes))
    kept = _local.__dict__.get("plane_scratch")
    if kept is None or len(kept) < nbytes:
        kept = _local.plane_scratch = bytearray(max(nbytes, 1 << 20))
    return memoryview(kept)[:nbytes]

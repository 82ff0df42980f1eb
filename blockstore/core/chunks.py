"""A chunk: a slice of one tensor's raw bytes, where its boundaries fall, and its stored form.

Boundaries are deterministic from (dtype, shape, chunk size) alone, so the same tensor always cuts
into the same chunks and an unchanged region of a fine-tuned tensor dedups against the old one.
They fall on whole elements, and on whole rows when a row fits, so a row lookup touches few chunks.

Stored value of a chunk: codec id and codec params, then the encoded bytes, framed (see `framing`)
so a reader takes the encoded bytes as a view of the value; decodable on its own. Earlier packs
stored msgpack `[codec id, codec params, encoded bytes]`, which still decodes.

Every tier takes the same path into a store (`prepare_chunk`): a chunk is keyed by the bytes its
stored form decodes to, and only a chunk the store lacks needs its stored value. Decoding
(`decode_chunk_into`) finds the codec in the registry the `blockstore.codecs` package fills when it
is imported, as this module's import of it guarantees, so a lossy chunk decodes whatever else a
program imported.

A delta chunk (`delta_value`) is stored as its difference from a base chunk that its envelope
names; decoding one needs a base reader (`BaseReader`, which `Repository` provides), and a base is
never itself a delta. Its key and checks are those of the bytes it decodes to, like any chunk's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import msgpack

from blockstore.codecs import (
    ByteGroupZstd,
    Codec,
    DecodeError,
    LossyCodec,
    Raw,
    codec_params,
    framing,
    is_lossy,
    stored_codec,
)
from blockstore.codecs import delta as deltas
from blockstore.codecs.nibbles import Base, Difference
from blockstore.core.dtypes import byte_unit, nbytes_of
from blockstore.core.hashing import ChunkKey, chunk_key, strong_digest
from blockstore.errors import ChunkCorrupt, ChunkMissing, InvalidArgument

DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 64
MAX_CHUNK_SIZE = 256 << 20


def check_chunk_size(chunk_size: int) -> None:
    """Refuse chunk sizes that make no sense for a store (too small to pay, too big to decode)."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgument(f"chunk size {chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")


def chunk_stride(dtype: str, shape: tuple[int, ...], chunk_size: int) -> int:
    """Bytes per chunk for this tensor: whole rows when a row fits, whole elements otherwise."""
    unit = byte_unit(dtype)
    row_bytes = nbytes_of(dtype, math.prod(shape[1:])) if len(shape) >= 2 else None
    if row_bytes and row_bytes <= chunk_size and row_bytes % unit == 0:
        return chunk_size // row_bytes * row_bytes
    return max(unit, chunk_size // unit * unit)


def chunk_ranges(dtype: str, shape: tuple[int, ...], nbytes: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges of each chunk of a tensor; empty for an empty tensor."""
    stride = chunk_stride(dtype, shape, chunk_size)
    return [(start, min(start + stride, nbytes)) for start in range(0, nbytes, stride)]


_MALFORMED = (DecodeError, InvalidArgument, ValueError, TypeError, msgpack.UnpackException)
"""What a stored value that does not parse or decode raises (reported as the chunk's damage)."""

DELTA_ID = "delta"
"""The codec id of a delta chunk's envelope (FORMAT.md §1): decoding it needs its base chunk."""


class BaseReader(Protocol):
    """How a reader hands a delta chunk its base (FORMAT.md §1); raises ChunkMissing or ChunkCorrupt
    for the base."""

    def __call__(
        self, key: ChunkKey, out: memoryview, difference: Difference | None = None, /
    ) -> bytes | bytearray | memoryview | None:
        """The `len(out)` bytes base chunk `key` decodes to, checked against its key. `out` is the
        delta's own buffer: a reader may decode the base into it and return it (the difference is
        then added in place). Given the delta's decoded `difference`, a reader may instead write
        base + difference into `out` itself (`decode_base_onto`: the base joined and the
        difference added a block at a time) and return None; the base is then not checked on its
        own, since the delta's check covers every byte of it, and a delta that fails its check
        reads its base again, checked, to say whether the base is what is damaged."""
        ...


@dataclass(frozen=True)
class DeltaHeader:
    """What a delta chunk's envelope says: the chunk it is a difference against, the element
    width of the difference, and the lossless codec the difference bytes are stored with."""

    base: ChunkKey
    width: int
    codec: Codec


def chunk_value(codec: Codec, payload: bytes) -> bytes:
    """The stored form of an encoded chunk: codec id and params travel with the payload."""
    return framing.frame([codec.id, codec_params(codec)], [payload])


def _envelope(value: bytes | memoryview) -> tuple[str, dict[str, object], bytes | memoryview]:
    """(codec id, params, payload) of a stored chunk value, framed or in an earlier pack's msgpack."""
    if framing.is_framed(value):
        fields, parts = framing.unframe(value)
        if not (isinstance(fields, list) and len(parts) == 1):
            raise DecodeError("malformed chunk envelope")
        fields = [*fields, parts[0]]
    else:
        fields = msgpack.unpackb(value, use_list=True, raw=False)
    if not (isinstance(fields, list) and len(fields) == 3):
        raise DecodeError("malformed chunk envelope")
    codec_id, params, payload = fields
    well_formed = isinstance(codec_id, str) and isinstance(params, dict)
    if not (well_formed and isinstance(payload, bytes | memoryview)):
        raise DecodeError("malformed chunk envelope")
    return codec_id, params, payload


def delta_header(value: bytes | memoryview) -> DeltaHeader | None:
    """The delta envelope of a stored value, or None for a chunk that decodes on its own. Raises
    DecodeError for a malformed value (so a reader reports it as the chunk's damage)."""
    codec_id, params, _ = _envelope(value)
    return _delta_header(params) if codec_id == DELTA_ID else None


def delta_base(value: bytes | memoryview) -> ChunkKey | None:
    """The base chunk a stored value is a delta against; None for a value that decodes on its own,
    and for one too malformed to say (its reader reports that as damage)."""
    return delta_base_at_start(lambda length: value[:length])


def delta_base_at_start(read: Callable[[int], bytes | memoryview]) -> ChunkKey | None:
    """`delta_base` from the start of a stored value, read by `read(n)` (the first n bytes): what a
    bundle reader learns of a shipped chunk without reading its payload. None also for a value too
    malformed to say (decoding it reports that)."""
    try:
        prefix = read(framing.PREFIX_LEN)
        if not framing.is_framed(prefix):
            return None
        fields = framing.fields_of(read(framing.header_len(prefix)))
        if not (isinstance(fields, list) and len(fields) == 2 and fields[0] == DELTA_ID):
            return None
        params = fields[1]
        return _delta_header(params).base if isinstance(params, dict) else None
    except _MALFORMED:
        return None


def is_delta_value(value: bytes | memoryview) -> bool:
    """Whether a stored value is a delta chunk (what makes a store format /3)."""
    return delta_base(value) is not None


def _delta_header(params: dict[str, object]) -> DeltaHeader:
    if set(params) != {"base", "width", "codec", "params"}:
        raise DecodeError(f"delta params {sorted(params)} are not base, width, codec and params")
    base, width, inner_id, inner_params = params["base"], params["width"], params["codec"], params["params"]
    if not (isinstance(base, bytes) and len(base) == 16):
        raise DecodeError("a delta's base is not a 16-byte chunk key")
    if not (type(width) is int and width in deltas.WIDTHS):
        raise DecodeError(f"delta width {width!r} is not one of {deltas.WIDTHS}")
    if not (isinstance(inner_id, str) and isinstance(inner_params, dict)) or inner_id == DELTA_ID:
        raise DecodeError("a delta's difference names no codec")
    inner = stored_codec(inner_id, inner_params)
    if is_lossy(inner):
        raise DecodeError(f"a delta's difference is stored with lossy codec {inner_id!r}")
    return DeltaHeader(base, width, inner)


def delta_value(
    raw: memoryview, base: ChunkKey, base_raw: bytes | bytearray | memoryview, width: int, level: int
) -> bytes:
    """The stored value of `raw` as a delta against chunk `base` (which decodes to `base_raw`)."""
    folded = deltas.difference(raw, base_raw, width)
    inner = deltas.difference_codec(folded, width, level)
    payload = inner.encode(memoryview(folded))
    params = {"base": base, "width": width, "codec": inner.id, "params": codec_params(inner)}
    return framing.frame([DELTA_ID, params], [payload])


def encode_chunk(codec: Codec, raw: memoryview) -> bytes:
    """Stored value for `raw` encoded with `codec`; a lossless chunk is kept raw when encoding does
    not pay (a lossy one cannot be: its key names its decoded bytes, not `raw`)."""
    encoded = codec.encode(raw)
    if len(encoded) >= len(raw) and not is_lossy(codec):
        codec, encoded = Raw(), bytes(raw)
    return chunk_value(codec, encoded)


def raw_value_len(raw_len: int) -> int:
    """Length of the stored value of a chunk of `raw_len` bytes kept raw (`encode_chunk`'s fallback):
    from a manifest's stored length alone, it tells a chunk stored raw from one a codec shrank."""
    return framing.framed_len([Raw.id, {}], [raw_len])


@dataclass(frozen=True)
class PreparedChunk:
    """A chunk ready for the store: its key, the bytes it decodes to, and its stored value on demand.

    A lossless chunk decodes to its raw bytes, so it is keyed before it is encoded, and only a chunk
    the store lacks pays for encoding (`stored_value`, run on pack's thread pool). A lossy chunk is
    keyed by its decoded bytes, so it was encoded to be keyed, and its stored value is already made.
    """

    key: ChunkKey
    raw_len: int
    decoded: bytes
    """What the stored chunk decodes to: the raw bytes unless the codec is lossy."""
    stored_value: Callable[[], bytes]


def prepare_chunk(codec: Codec, raw: bytes) -> PreparedChunk:
    """Encode (or arrange to encode) one chunk's raw bytes with `codec` and key it."""
    if not is_lossy(codec):
        return PreparedChunk(chunk_key(raw), len(raw), raw, lambda: encode_chunk(codec, memoryview(raw)))
    lossy: LossyCodec = codec  # type: ignore[assignment]
    payload, decoded = lossy.encode_with_decoded(memoryview(raw))
    value = chunk_value(codec, payload)
    return PreparedChunk(chunk_key(decoded), len(raw), decoded, lambda: value)


def decode_chunk_into(
    key: ChunkKey,
    value: bytes | memoryview,
    out: memoryview,
    strong: bytes | None = None,
    base: BaseReader | None = None,
) -> None:
    """Decode a stored chunk straight into `out` (exactly its raw length) and check it is the chunk
    `key` names; raises ChunkCorrupt otherwise. The lazy runtime decodes into one tensor buffer.

    With `strong` (the BLAKE3 digest a version 3 snapshot promises) the decoded bytes are checked
    against it instead of the key: it implies the key check, and unlike xxh3 it cannot be met by
    other bytes built to collide, so no reader hands out a chunk the snapshot did not promise.

    A delta chunk is decoded with its base chunk's bytes from `base`; without one (a base being
    decoded: chains are one deep, FORMAT.md §1) a delta is refused as damage. Its check is that of
    any chunk, on the bytes it decodes to, so a wrong base can never pass as the chunk."""
    unchecked_base: ChunkKey | None = None
    try:
        codec_id, params, payload = _envelope(value)
        if codec_id == DELTA_ID:
            unchecked_base = _decode_delta(key, _delta_header(params), payload, out, base)
        else:
            stored_codec(codec_id, params).decode_into(payload, out)
    except _MALFORMED as exc:
        raise ChunkCorrupt(key.hex(), exc) from None
    if strong is not None:
        if strong_digest(out) == strong:
            return
        reason = strong_mismatch(chunk_key(out) == key)
    elif chunk_key(out) == key:
        return
    else:
        reason = "decoded bytes do not hash to the chunk's key"
    if unchecked_base is not None and base is not None:
        _blame_base(key, unchecked_base, len(out), base)
    raise ChunkCorrupt(key.hex(), reason)


def _decode_delta(
    key: ChunkKey,
    header: DeltaHeader,
    payload: bytes | memoryview,
    out: memoryview,
    base: BaseReader | None,
) -> ChunkKey | None:
    """Decode delta chunk `key` into `out`; returns its base's key when the base was decoded
    with the difference added and not checked on its own (`BaseReader`), else None."""
    if base is None:
        raise DecodeError(
            f"a delta against chunk {header.base.hex()} where a base was being read (chains are one deep)"
        )
    if header.base == key:
        raise DecodeError("a delta against itself")
    difference = deltas.decoded_difference(header.codec, payload, len(out), header.width)
    try:
        base_bytes = base(header.base, out, difference) if difference is not None else base(header.base, out)
    except (ChunkCorrupt, ChunkMissing) as exc:
        raise ChunkCorrupt(key.hex(), f"its base: {exc}") from None
    if base_bytes is None:  # the reader added the difference as it decoded the base
        return header.base
    deltas.decode_onto(header.codec, payload, out, base_bytes, header.width, difference)
    return None


def _blame_base(key: ChunkKey, base_key: ChunkKey, raw_len: int, base: BaseReader) -> None:
    """A delta decoded onto a base that was not checked on its own failed its check: raise naming
    the base if it is the base that is damaged or missing (read again, checked)."""
    try:
        base(base_key, memoryview(bytearray(raw_len)))
    except (ChunkCorrupt, ChunkMissing) as exc:
        raise ChunkCorrupt(key.hex(), f"its base: {exc}") from None


def decode_base_onto(
    key: ChunkKey, value: bytes | memoryview, out: memoryview, difference: Difference
) -> None:
    """Decode base chunk `key` from its stored `value` into `out` with a delta's `difference`
    added (a `BaseReader`'s fused path): a byte-grouped base is joined and added to a block at a
    time; any other is decoded, then added to in place. The base's own damage raises ChunkCorrupt
    for `key`; the difference's, DecodeError (the delta's). Not checked against `key`: the
    delta's check covers these bytes (`BaseReader`)."""
    try:
        codec_id, params, payload = _envelope(value)
        if codec_id == DELTA_ID:
            raise DecodeError("a delta where a base was being read (chains are one deep)")
        codec = stored_codec(codec_id, params)
        if isinstance(codec, ByteGroupZstd) and codec.itemsize == difference.width:
            onto: Base = (codec.decoded_planes(payload, len(out)), codec.split_sign)
        else:
            codec.decode_into(payload, out)
            onto = out
    except _MALFORMED as exc:
        raise ChunkCorrupt(key.hex(), exc) from None
    difference.add_onto(out, onto)


def strong_mismatch(key_matches: bool) -> str:
    """Why a chunk's bytes are not the ones promised: a collision when they still hash to its key."""
    if key_matches:
        return "xxh3 key collision: the bytes hash to the key but are not the bytes the snapshot promises"
    return "decoded bytes do not hash to the chunk's key"


def decode_chunk(
    key: ChunkKey,
    value: bytes | memoryview,
    raw_len: int,
    strong: bytes | None = None,
    base: BaseReader | None = None,
) -> bytearray:
    """Decode a stored chunk into a new buffer (see `decode_chunk_into`)."""
    out = bytearray(raw_len)
    decode_chunk_into(key, value, memoryview(out), strong, base)
    return out

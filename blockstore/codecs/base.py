"""What every codec is: a frozen dataclass with an id, whose fields are the params stored beside
each chunk it encodes, so a chunk decodes on its own (zarr's habit).

Lossless and lossy codecs share this one interface; `tier` tells them apart. A lossless codec's
chunk decodes to the bytes it was given, so a chunk can be keyed (and deduplicated) before it is
encoded. A lossy codec's chunk decodes to other bytes, and the chunk is keyed by those: it is
encoded first (`LossyCodec.encode_with_decoded`), then keyed, and the usual check of a stored chunk
(decoded bytes hash to the key) proves its integrity all the same.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

LOSSLESS = "lossless"
"""The `tier` of every codec that gives back exactly the bytes it encoded."""


class DecodeError(ValueError):
    """Stored bytes that do not decode to what the manifest promises (the caller names the chunk)."""


class Codec(Protocol):
    """What every codec provides. Implementations are frozen dataclasses; their fields are the
    params stored with each chunk, so `type(codec)(**params)` rebuilds it."""

    id: ClassVar[str]
    """Names the codec in every chunk it encodes; never reused for other bytes."""
    tier: ClassVar[str]
    """`LOSSLESS`, or the lossy tier the codec implements (its id: int8, int4, fp8)."""

    def encode(self, raw: memoryview) -> bytes: ...

    def decode_into(self, data: bytes | memoryview, out: memoryview) -> None:
        """Decode `data` into `out`, which must come out exactly full: the sizes `data` records are
        checked against `len(out)` before anything is written or allocated, and a mismatch raises
        DecodeError. (A lossy payload records whole blocks, not elements: an `out` short of the
        last block's end by less than a block is caught by the chunk's key check instead.)"""
        ...


class LossyCodec(Codec, Protocol):
    """A codec whose chunks decode to an approximation of what it encoded."""

    def encode_with_decoded(self, raw: memoryview) -> tuple[bytes, bytes]:
        """(payload, the bytes the payload decodes to), from one encoding: the chunk is keyed by,
        and its error measured from, the decoded bytes."""
        ...


def is_lossy(codec: Codec | type[Codec]) -> bool:
    """Whether chunks of `codec` (an instance or a class) decode to other bytes than they held."""
    return codec.tier != LOSSLESS

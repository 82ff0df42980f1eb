"""Codecs: small frozen values with an id whose params travel with every chunk.

Lossless (`lossless`: raw, zstd, byte planes with zstd; `nibbles`: small integers, which is how a
delta chunk's difference is usually stored) and lossy (`lossy`: int8, int4, fp8 blocks) codecs
share one interface (`base.Codec`; `is_lossy` tells the tiers apart), and `error` measures a
lossy tier's error as its own step. Importing this package, or any module in it, registers every
codec below in the one table (`registry`), so a stored chunk decodes whichever module a program
imported first.
"""

from blockstore.codecs.base import LOSSLESS, Codec, DecodeError, LossyCodec, is_lossy
from blockstore.codecs.error import ErrorMeasure, ErrorMeter, measure_error
from blockstore.codecs.lossless import ByteGroupZstd, Raw, Zstd
from blockstore.codecs.lossy import (
    DEFAULT_BLOCK_SIZE,
    LOSSY_CODECS,
    LOSSY_SOURCE_DTYPES,
    Fp8Block,
    Int4Block,
    Int8Block,
    lossy_codec,
)
from blockstore.codecs.nibbles import Nibbles
from blockstore.codecs.registry import (
    CODECS,
    codec_class,
    codec_params,
    lossless_ids,
    lossy_ids,
    make_codec,
    register,
    stored_codec,
)

for _codec in (Raw, Zstd, ByteGroupZstd, Nibbles, Int8Block, Int4Block, Fp8Block):
    register(_codec)
del _codec

__all__ = [
    "CODECS",
    "DEFAULT_BLOCK_SIZE",
    "LOSSLESS",
    "LOSSY_CODECS",
    "LOSSY_SOURCE_DTYPES",
    "ByteGroupZstd",
    "Codec",
    "DecodeError",
    "ErrorMeasure",
    "ErrorMeter",
    "Fp8Block",
    "Int4Block",
    "Int8Block",
    "LossyCodec",
    "Nibbles",
    "Raw",
    "Zstd",
    "codec_class",
    "codec_params",
    "is_lossy",
    "lossless_ids",
    "lossy_codec",
    "lossy_ids",
    "make_codec",
    "measure_error",
    "register",
    "stored_codec",
]

"""Codecs: small frozen values with an id whose params travel with every chunk.

Importing this package registers every codec blockstore knows, lossless and lossy, so a stored
chunk decodes whichever module a program imported first.
"""

from blockstore.codecs.lossless import CODECS, ByteGroupZstd, Codec, DecodeError, Raw, Zstd, make_codec
from blockstore.codecs.lossy import LOSSY_CODECS, lossy_codec

__all__ = [
    "CODECS",
    "LOSSY_CODECS",
    "ByteGroupZstd",
    "Codec",
    "DecodeError",
    "Raw",
    "Zstd",
    "lossy_codec",
    "make_codec",
]

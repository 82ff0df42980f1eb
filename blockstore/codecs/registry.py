"""The codec table: codec id → codec class, for every chunk a store may hold.

The `blockstore.codecs` package fills it when it is imported, with every codec it defines, lossless
and lossy; importing any part of the package (this module included) runs that first. So any path
that decodes a chunk finds its codec whatever a program imported before, and no codec module
registers itself as a side effect of being imported by someone else.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict
from types import MappingProxyType

from blockstore.codecs.base import Codec, is_lossy
from blockstore.errors import InvalidArgument

_TABLE: dict[str, type[Codec]] = {}
CODECS: Mapping[str, type[Codec]] = MappingProxyType(_TABLE)
"""Every registered codec by id (read-only: `register` adds to it)."""


def register(cls: type[Codec]) -> type[Codec]:
    """Add a codec class under its id; an id already taken by another class is refused, since
    chunks already stored under that id would decode with the wrong codec."""
    existing = _TABLE.get(cls.id)
    if existing is not None and existing is not cls:
        raise ValueError(f"codec id {cls.id!r} is already registered to {existing.__qualname__}")
    _TABLE[cls.id] = cls
    return cls


def codec_class(codec_id: str) -> type[Codec]:
    """The class registered under `codec_id`; an unknown id is refused naming the known ones."""
    cls = _TABLE.get(codec_id)
    if cls is None:
        raise InvalidArgument(f"unknown codec {codec_id!r}; known: {', '.join(sorted(_TABLE))}")
    return cls


def lossless_ids() -> tuple[str, ...]:
    return tuple(codec_id for codec_id, cls in _TABLE.items() if not is_lossy(cls))


def lossy_ids() -> tuple[str, ...]:
    return tuple(codec_id for codec_id, cls in _TABLE.items() if is_lossy(cls))


def make_codec(codec_id: str, params: Mapping[str, object]) -> Codec:
    """Rebuild a codec from its id and params (from a chunk, a manifest or the command line)."""
    cls = codec_class(codec_id)
    try:
        return cls(**params)
    except TypeError as exc:
        raise InvalidArgument(f"bad parameters for codec {codec_id!r}: {exc}") from None


def codec_params(codec: Codec) -> dict[str, int | bool | str]:
    """The parameters stored next to every chunk so it decodes on its own."""
    return asdict(codec)  # type: ignore[call-overload]


def stored_codec(codec_id: str, params: dict[str, object]) -> Codec:
    """`make_codec` for a stored chunk, remembered: every chunk of a pack names the same few codecs,
    and building one (a dataclass and its checks) per chunk read was a tenth of a small chunk's
    decode. Values are keyed with their types, so 2 and 2.0 (or 1 and True) never share a codec."""
    try:
        return _remembered_codec(codec_id, tuple((key, type(value), value) for key, value in params.items()))
    except TypeError:  # unhashable params: make_codec refuses them with the usual message
        return make_codec(codec_id, params)


@functools.lru_cache(maxsize=64)
def _remembered_codec(codec_id: str, params: tuple[tuple[object, type, object], ...]) -> Codec:
    return make_codec(codec_id, {key: value for key, _, value in params})  # type: ignore[misc]

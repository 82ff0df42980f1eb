"""Sizes as people write them ('2GB', '512MiB', '1.5G') for budgets and cache bounds."""

from __future__ import annotations

import re

from blockstore.errors import InvalidArgument

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", re.I)
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30}


def parse_size(size: int | str | None, what: str = "budget") -> int | None:
    """'2GB', '512MiB', '1.5G' or a byte count → bytes; None means no bound."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size < 0:
            raise InvalidArgument(f"{what} {size} is negative")
        return size
    match = _SIZE.fullmatch(size)
    unit = match.group(2).upper().removesuffix("B") if match else None
    if match is None or unit not in _UNITS:
        raise InvalidArgument(f"{what} {size!r} is not a size like '2GB', '512MiB' or 1000000")
    return int(float(match.group(1)) * _UNITS[unit])

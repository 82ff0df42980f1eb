"""The safetensors dtype table: element width in bits for every dtype the format defines.

Widths are in bits because the format has sub-byte types (F4: two values per byte; F6: four values
in three bytes). Everything else in blockstore derives byte counts and alignment from this table.
"""

from __future__ import annotations

import math

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

INTEGER_DTYPES = frozenset({"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"})


def nbytes_of(dtype: str, numel: int) -> int | None:
    """Bytes that `numel` elements of `dtype` occupy, or None when they do not fill whole bytes."""
    bits = DTYPE_BITS[dtype] * numel
    return bits // 8 if bits % 8 == 0 else None


def byte_unit(dtype: str) -> int:
    """Smallest run of whole bytes that holds whole elements: a chunk boundary must fall on it."""
    bits = DTYPE_BITS[dtype]
    return math.lcm(bits, 8) // 8


def plane_count(dtype: str) -> int:
    """Bytes per element for byte grouping (1 for sub-byte and byte types: nothing to split)."""
    return max(1, DTYPE_BITS[dtype] // 8)

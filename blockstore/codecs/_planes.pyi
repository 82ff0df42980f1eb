"""Types of the optional C extension built from _planes.c (see setup.py): plane joins and nibble unpacking."""

from collections.abc import Sequence

import numpy as np

def join(
    planes: Sequence[bytes | bytearray | memoryview | np.ndarray], out: memoryview, split_sign: bool, /
) -> None: ...
def nibbles(
    bitmap: bytes | bytearray | memoryview,
    packed: bytes | bytearray | memoryview,
    nonzero: int,
    exceptions: bytes | bytearray | memoryview,
    out: memoryview,
    width: int,
    base: bytes | bytearray | memoryview | tuple[Sequence[bytes | memoryview], bool] | None,
    /,
) -> None: ...
def vectors(level: int, /) -> int: ...
def best_vectors() -> int: ...

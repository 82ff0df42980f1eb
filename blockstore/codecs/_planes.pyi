"""Types of the optional C extension built from _planes.c (see setup.py): plane joins and nibble unpacking."""

from collections.abc import Sequence

import numpy as np

def join(
    planes: Sequence[bytes | bytearray | memoryview | np.ndarray], out: memoryview, split_sign: bool, /
) -> None: ...
def nibbles(
    packed: bytes | bytearray | memoryview,
    exceptions: bytes | bytearray | memoryview,
    out: memoryview,
    width: int,
    base: bytes | bytearray | memoryview | tuple[Sequence[bytes | memoryview], bool] | None,
    /,
) -> None: ...
def vector_marks(on: bool, /) -> bool: ...

"""Types of the optional C extension built from _planes.c (see setup.py)."""

from collections.abc import Sequence

import numpy as np

def join(
    planes: Sequence[bytes | bytearray | memoryview | np.ndarray], out: memoryview, split_sign: bool, /
) -> None: ...

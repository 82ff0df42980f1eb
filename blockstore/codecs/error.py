"""How far a lossy tier's decoded bytes are from the original: its own step, apart from encoding.

`pack` measures each lossy tensor chunk by chunk as it encodes it, and records the result beside
the tensor: the largest absolute difference and the relative Frobenius norm
||decoded - original|| / ||original||. Both are computed in float64 from the elements' exact values
(every lossy source dtype converts to float32 exactly), with sums kept over the whole tensor, so
the figure does not depend on where chunks were cut and does not overflow on large tensors.
Recorded errors are part of a snapshot's content, so this arithmetic must not change.

torch is imported on first use, as in `lossy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from blockstore.codecs.lossy import torch_dtype


@dataclass(frozen=True)
class ErrorMeasure:
    """The error of decoded bytes against the original ones."""

    max_abs: float
    rel_frobenius: float
    """inf when the original is all zeros and the decoded bytes are not."""


class ErrorMeter:
    """Accumulates the error of one tensor of `dtype` over its chunks, in order or not."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.max_abs = 0.0
        self.error_sq = 0.0
        self.original_sq = 0.0

    def add(self, original: bytes | memoryview, decoded: bytes | memoryview) -> None:
        """Count one chunk: its original bytes and the bytes its stored form decodes to."""
        import torch

        if len(original) != len(decoded):
            raise ValueError(f"decoded chunk holds {len(decoded)} bytes, the original {len(original)}")
        if not original:
            return
        dtype = torch_dtype(self.dtype)
        before = torch.frombuffer(bytearray(original), dtype=dtype).float().double()
        difference = torch.frombuffer(bytearray(decoded), dtype=dtype).float().double() - before
        self.max_abs = max(self.max_abs, float(difference.abs().max()))
        self.error_sq += float(difference.square().sum())
        self.original_sq += float(before.square().sum())

    def result(self) -> ErrorMeasure:
        if self.original_sq == 0:
            return ErrorMeasure(self.max_abs, 0.0 if self.error_sq == 0 else math.inf)
        return ErrorMeasure(self.max_abs, math.sqrt(self.error_sq / self.original_sq))


def measure_error(original: bytes | memoryview, decoded: bytes | memoryview, dtype: str) -> ErrorMeasure:
    """The error of one buffer of `dtype` elements against the original."""
    meter = ErrorMeter(dtype)
    meter.add(original, decoded)
    return meter.result()

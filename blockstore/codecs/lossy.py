"""Lossy tiers for static tensors: per-block absmax quantization to int8, int4 or fp8 (e4m3).

Each codec is a frozen dataclass behind the same interface as the lossless ones (`base.Codec`; its
`tier` is its id), with its params (original dtype, block size, zstd level) stored beside every
chunk; the `blockstore.codecs` package registers them with the rest. A chunk's elements are cut into
blocks of `block_size`; each block keeps one float32 scale (absmax / the format's largest value) and
its quantized values. Decoding returns the original dtype's bytes.

A lossy chunk is keyed by the hash of its *decoded* bytes, so the usual check (decoded bytes hash to
the key) still proves integrity, and the same weights at the same tier dedup. Reconstruction is
elementwise float32 arithmetic (no reductions), hence bit-reproducible between encode and decode.

torch is imported on first use: the CLI and lossless paths do not pay its import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import msgpack

from blockstore.codecs.base import DecodeError
from blockstore.codecs.lossless import _check_level, _compressor, zstd_decompress_exact
from blockstore.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

LOSSY_SOURCE_DTYPES = ("F32", "F16", "BF16")
DEFAULT_BLOCK_SIZE = 64


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a lossy source dtype (a safetensors name)."""
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]


def _frame_tensor(frame: bytes, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """A zstd frame that must hold exactly `nbytes`, as a tensor of `dtype`."""
    import torch

    return torch.frombuffer(zstd_decompress_exact(frame, nbytes), dtype=dtype)


@dataclass(frozen=True)
class _BlockQuant:
    """Shared frame of the three formats: blocks, scales, validation; subclasses map values."""

    id: ClassVar[str]
    tier: ClassVar[str]
    qmax: ClassVar[float]
    dtype: str = "F32"
    block_size: int = DEFAULT_BLOCK_SIZE
    level: int = 3

    def __post_init__(self) -> None:
        _check_level(self.level)
        if self.dtype not in LOSSY_SOURCE_DTYPES:
            raise InvalidArgument(
                f"tier {self.id} applies to {', '.join(LOSSY_SOURCE_DTYPES)}, not {self.dtype}"
            )
        if not 2 <= self.block_size <= 1 << 16 or self.block_size % 2:
            raise InvalidArgument(f"block size {self.block_size} must be even and within 2..65536")

    # subclass hooks: float32 blocks already divided by their scale <-> stored bytes
    def _quantize(self, scaled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dequantize(self, stored: torch.Tensor, count: int) -> torch.Tensor:
        """`count` stored values as exact numbers (any dtype torch multiplies by a float32 scale)."""
        raise NotImplementedError

    def _stored_len(self, padded: int) -> int:
        return padded

    # encode / decode -------------------------------------------------------------------------------

    def quantize(self, raw: memoryview) -> tuple[bytes, torch.Tensor]:
        """(payload, decoded tensor in the original dtype) for `raw` original-dtype bytes: the pack
        keys the chunk by the decoded bytes and measures the error from them."""
        import torch

        values = torch.frombuffer(bytearray(raw), dtype=torch_dtype(self.dtype)).float()
        if not bool(torch.isfinite(values).all()):
            raise InvalidArgument(f"tier {self.id} needs finite values; this chunk holds inf or nan")
        padded = -(-values.numel() // self.block_size) * self.block_size
        blocks = torch.nn.functional.pad(values, (0, padded - values.numel())).view(-1, self.block_size)
        scales = blocks.abs().amax(dim=1) / self.qmax
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        stored = self._quantize(blocks / scales[:, None])
        frames = [_compressor(self.level).compress(t.numpy().tobytes()) for t in (scales, stored)]
        decoded = torch.empty(values.numel(), dtype=torch_dtype(self.dtype))
        self._reconstruct_into(stored, scales, decoded)
        return msgpack.packb(frames, use_bin_type=True), decoded

    def _reconstruct_into(self, stored: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        """`out` (the original dtype) = each stored value times its block's float32 scale, rounded
        once to `out`'s dtype: elementwise only, so bit-reproducible between encode and decode, and
        written straight into `out` (no float32 copy of the chunk, which made int8 loads slower
        than lossless ones)."""
        import torch

        count, size = out.numel(), self.block_size
        full = count // size
        values = self._dequantize(stored, scales.numel() * size)
        if full:
            blocks = values[: full * size].view(full, size)
            torch.mul(blocks, scales[:full, None], out=out[: full * size].view(full, size))
        if count > full * size:  # the last block, cut short by the chunk's end
            torch.mul(values[full * size : count], scales[full], out=out[full * size :])

    def encode(self, raw: memoryview) -> bytes:
        return self.quantize(raw)[0]

    def encode_with_decoded(self, raw: memoryview) -> tuple[bytes, bytes]:
        import torch

        payload, decoded = self.quantize(raw)
        return payload, decoded.view(torch.uint8).numpy().tobytes()

    def decode_into(self, data: bytes | memoryview, out: memoryview) -> None:
        import torch

        itemsize = 4 if self.dtype == "F32" else 2
        if len(out) % itemsize:
            raise DecodeError(f"{len(out)} bytes is not a whole number of {self.dtype} elements")
        count = len(out) // itemsize
        blocks = -(-count // self.block_size)
        try:
            scale_frame, value_frame = msgpack.unpackb(data, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise DecodeError(f"{self.id} payload does not parse ({exc})") from None
        if not (isinstance(scale_frame, bytes) and isinstance(value_frame, bytes)):
            raise DecodeError(f"{self.id} payload is malformed")
        scales = _frame_tensor(scale_frame, 4 * blocks, torch.float32)
        stored = _frame_tensor(value_frame, self._stored_len(blocks * self.block_size), torch.uint8)
        if count:
            self._reconstruct_into(stored, scales, torch.frombuffer(out, dtype=torch_dtype(self.dtype)))


@dataclass(frozen=True)
class Int8Block(_BlockQuant):
    """int8 in -127..127 per block: about 4x smaller than fp32, error ≤ scale / 2 per element."""

    id: ClassVar[str] = "int8"
    tier: ClassVar[str] = "int8"
    qmax: ClassVar[float] = 127.0

    def _quantize(self, scaled: torch.Tensor) -> torch.Tensor:
        import torch

        return scaled.round().clamp(-127, 127).to(torch.int8).view(torch.uint8).reshape(-1)

    def _dequantize(self, stored: torch.Tensor, count: int) -> torch.Tensor:
        import torch

        return stored.view(torch.int8)


@dataclass(frozen=True)
class Int4Block(_BlockQuant):
    """int4 in -7..7 per block, two values per byte (low nibble first)."""

    id: ClassVar[str] = "int4"
    tier: ClassVar[str] = "int4"
    qmax: ClassVar[float] = 7.0

    def _stored_len(self, padded: int) -> int:
        return padded // 2

    def _quantize(self, scaled: torch.Tensor) -> torch.Tensor:
        import torch

        nibbles = (scaled.round().clamp(-7, 7).to(torch.int16) + 8).to(torch.uint8).reshape(-1, 2)
        return nibbles[:, 0] | (nibbles[:, 1] << 4)

    def _dequantize(self, stored: torch.Tensor, count: int) -> torch.Tensor:
        import torch

        pairs = torch.stack([stored & 0x0F, stored >> 4], dim=1).reshape(-1)
        return pairs.view(torch.int8) - 8


@dataclass(frozen=True)
class Fp8Block(_BlockQuant):
    """float8 e4m3 (largest finite 448) per block: relative precision instead of uniform steps."""

    id: ClassVar[str] = "fp8"
    tier: ClassVar[str] = "fp8"
    qmax: ClassVar[float] = 448.0

    def _quantize(self, scaled: torch.Tensor) -> torch.Tensor:
        import torch

        return scaled.to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1)

    def _dequantize(self, stored: torch.Tensor, count: int) -> torch.Tensor:
        import torch

        return stored.view(torch.float8_e4m3fn).float()  # torch has no float8 arithmetic on the CPU


LOSSY_CODECS: dict[str, type[_BlockQuant]] = {codec.id: codec for codec in (Int8Block, Int4Block, Fp8Block)}
"""The codecs of this module by tier (the package registers them; this module registers nothing)."""


def lossy_codec(tier: str, dtype: str, block_size: int, level: int = 3) -> _BlockQuant:
    """The codec for a lossy tier on a tensor of `dtype`."""
    cls = LOSSY_CODECS.get(tier)
    if cls is None:
        raise InvalidArgument(f"{tier!r} is not a lossy tier; known: {', '.join(LOSSY_CODECS)}")
    return cls(dtype=dtype, block_size=block_size, level=level)

"""Test helpers: real safetensors files from safetensors' own writer, and CLI invocation."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import TensorSpec, serialize_file
from typer.testing import CliRunner

from blockstore.cli.app import app
from blockstore.core.dtypes import DTYPE_BITS, nbytes_of

# safetensors' writer names for each header dtype. F6 types are in the format but its Python writer
# cannot produce them, so those files are written by hand in the same layout.
WRITER_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": "float4_e2m1fn_x2",
}
ALL_DTYPES = sorted(DTYPE_BITS)
FUZZ_EXAMPLES = int(os.environ.get("BLOCKSTORE_FUZZ_EXAMPLES", "100"))
"""Hypothesis examples per fuzz target: CI-sized by default; the campaign sets thousands."""


@dataclass(frozen=True)
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> RawTensor:
    """A tensor of random bytes (BOOL gets valid 0/1 bytes)."""
    nbytes = nbytes_of(dtype, math.prod(shape))
    assert nbytes is not None, (dtype, shape)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256 if dtype != "BOOL" else 2, size=nbytes, dtype=np.uint8).tobytes()
    return RawTensor(dtype, shape, data)


def write_safetensors(
    path: Path, tensors: dict[str, RawTensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file with the reference writer (by hand only for F6 dtypes)."""
    if any(t.dtype.startswith("F6") for t in tensors.values()):
        return _write_by_hand(path, tensors, metadata)
    buffers = {
        name: np.frombuffer(t.data, dtype=np.uint8) if t.data else np.zeros(1, np.uint8)
        for name, t in tensors.items()
    }
    specs = {}
    for name, tensor in tensors.items():
        shape = list(tensor.shape)
        if tensor.dtype == "F4":  # the writer takes the storage shape and doubles the last axis
            shape = [*shape[:-1], shape[-1] // 2] if shape else shape
        specs[name] = TensorSpec(
            dtype=WRITER_NAMES[tensor.dtype],
            shape=shape,
            data_ptr=buffers[name].ctypes.data,
            data_len=len(tensor.data),
        )
    serialize_file(specs, str(path), metadata=metadata)
    return path


def _write_by_hand(path: Path, tensors: dict[str, RawTensor], metadata: dict[str, str] | None) -> Path:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in sorted(tensors.items()):
        header[name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(tensor.data)],
        }
        offset += len(tensor.data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    body = b"".join(tensor.data for _, tensor in sorted(tensors.items()))
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return path


def write_raw_file(
    path: Path, header: bytes | dict, body: bytes = b"", header_len: int | None = None
) -> Path:
    """A possibly invalid safetensors file: any header bytes, any declared length."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    declared = len(text) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", declared) + text + body)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def cli(*args: object) -> CliResult:
    """Run the `blockstore` app in-process."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(result: CliResult, *fragments: str, exit_code: int | None = None) -> None:
    """A user error: non-zero exit, exactly one stderr line naming the problem, no traceback."""
    assert result.exit_code != 0, result
    if exit_code is not None:
        assert result.exit_code == exit_code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("blockstore: error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write_llama(directory: Path, **config_values: object) -> Path:
    """A seeded random-init Llama checkpoint (weights + config.json) as a checkpoint would be saved:
    with tied embeddings, the tied lm_head.weight is not written."""
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = transformers.LlamaConfig(architectures=["LlamaForCausalLM"], **config_values)
    model = transformers.LlamaForCausalLM(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    weights = {name: t.contiguous() for name, t in model.state_dict().items() if name not in tied}
    save_file(weights, directory / "model.safetensors")
    config.save_pretrained(directory)
    return directory

"""A store packed with a lossy tier reads back in a fresh interpreter that never imports `pack`.

Lossy codecs once entered the codec table only when something imported the quantizer (through
`policy` or `pack`), so a program that only verified, exported or loaded an int8 store reported
every lossy chunk corrupt ("unknown codec 'int8'"). The child process here imports only the
reading side and must see the store clean and exactly what pack wrote.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from blockstore.codecs import lossy_codec
from blockstore.core.chunks import chunk_ranges, prepare_chunk
from blockstore.core.policy import Policy
from blockstore.ops.pack import pack
from blockstore.repo import Repository

from .helpers import RawTensor, write_safetensors

CHUNK = 64 << 10

READER = """
import hashlib, json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from blockstore import runtime
from blockstore.ops.export import export
from blockstore.ops.verify import verify
from blockstore.repo import Repository

store, out = sys.argv[1], Path(sys.argv[2])


def sha(tensor):
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


with Repository.open(store) as repo:
    report = verify(repo, deep=True)
    assert report.clean, [str(damage) for damage in report.damages]
    written = export(repo, repo.resolve("main"), out).paths
with runtime.open(store) as state:
    lazy = {name: sha(state[name].materialize()) for name in state}
exported = {name: sha(tensor) for name, tensor in load_file(written[0]).items()}
loaded = sorted(name for name in sys.modules if name.startswith("blockstore"))
print(json.dumps({"chunks": report.chunks, "lazy": lazy, "exported": exported, "loaded": loaded}))
"""


def floats(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> RawTensor:
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    name = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    return RawTensor(name, shape, values.view(torch.uint8).numpy().tobytes())


def test_int8_store_verifies_exports_and_loads_in_a_fresh_interpreter(tmp_path: Path) -> None:
    tensors = {
        "model.embed_tokens.weight": floats((512, 96), torch.bfloat16, 1),  # static: int8
        "layers.0.mlp.up_proj.weight": floats((300, 130), torch.float32, 2),  # static, several chunks
        "layers.0.mlp.down_proj.weight": floats((130, 300), torch.float16, 3),  # static
        "layers.0.self_attn.q_proj.weight": floats((96, 96), torch.float32, 4),  # dynamic: lossless
        "layers.0.input_layernorm.weight": floats((96,), torch.float32, 5),  # dynamic
        "position_ids": RawTensor("I64", (64,), np.arange(64, dtype=np.int64).tobytes()),
    }
    source = write_safetensors(tmp_path / "model.safetensors", tensors)
    store = tmp_path / "store"
    with Repository.init(store, chunk_size=CHUNK) as repo:
        result = pack(repo, [source], policy=Policy(static_tier="int8"))
        snapshot = repo.snapshot(result.snapshot_id)
    lossy = {name for name, entry in snapshot.tensors.items() if entry.tier == "int8"}
    assert lossy == {name for name in tensors if "mlp" in name or "embed" in name}

    # What pack wrote: every chunk's decoded bytes, made by the codec itself, not by a decoder.
    expected = {}
    for name, tensor in tensors.items():
        decoded = tensor.data
        if name in lossy:
            codec = lossy_codec("int8", tensor.dtype, Policy().block_size)
            ranges = chunk_ranges(tensor.dtype, tensor.shape, len(tensor.data), CHUNK)
            decoded = b"".join(prepare_chunk(codec, tensor.data[start:end]).decoded for start, end in ranges)
            assert decoded != tensor.data
        expected[name] = hashlib.sha256(decoded).hexdigest()

    done = subprocess.run(
        [sys.executable, "-c", READER, str(store), str(tmp_path / "out.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout)
    assert "blockstore.ops.pack" not in read["loaded"], read["loaded"]
    assert read["chunks"] == sum(len(entry.chunks) for entry in snapshot.tensors.values()) > len(tensors)
    assert read["lazy"] == expected
    assert read["exported"] == expected

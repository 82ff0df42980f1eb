"""The codec layer: one registry the package fills, one interface for lossless and lossy codecs,
error measurement as its own step, and one chunk path (`prepare_chunk`) for every tier."""

from __future__ import annotations

import ast
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import blockstore.codecs as codecs
from blockstore.codecs import (
    CODECS,
    LOSSLESS,
    ByteGroupZstd,
    DecodeError,
    Nibbles,
    Raw,
    Zstd,
    codec_class,
    codec_params,
    is_lossy,
    lossless_ids,
    lossy_codec,
    lossy_ids,
    make_codec,
    measure_error,
    register,
)
from blockstore.codecs.error import ErrorMeter
from blockstore.core.chunks import chunk_value, decode_chunk, encode_chunk, prepare_chunk, raw_value_len
from blockstore.core.hashing import chunk_key
from blockstore.core.policy import LOSSY_TIERS
from blockstore.errors import ChunkCorrupt, InvalidArgument

CODECS_DIR = Path(codecs.__file__).parent
VALUES = np.random.default_rng(11).normal(0, 0.05, 4096 + 37).astype(np.float32)


def sample_codecs() -> list[codecs.Codec]:
    """One instance of every registered codec, on float32 input."""
    made = {
        "raw": Raw(),
        "zstd": Zstd(),
        "bytegroup+zstd": ByteGroupZstd(itemsize=4, split_sign=True),
        "nibbles+zstd": Nibbles(width=4),
        **{tier: lossy_codec(tier, "F32", 64) for tier in lossy_ids()},
    }
    assert set(made) == set(CODECS), "a registered codec has no sample here"
    return list(made.values())


def test_the_package_registers_every_codec_lossless_and_lossy() -> None:
    assert set(lossless_ids()) == {"raw", "zstd", "bytegroup+zstd", "nibbles+zstd"}
    assert set(lossy_ids()) == set(LOSSY_TIERS) == {"int8", "int4", "fp8"}
    for codec_id, cls in CODECS.items():
        assert codec_class(codec_id) is cls and cls.id == codec_id
        assert is_lossy(cls) == (cls.tier != LOSSLESS)
        assert not is_lossy(cls) or cls.tier == codec_id  # a lossy codec's tier is its id


def test_only_the_package_registers_codecs() -> None:
    """No codec module fills the table as a side effect of being imported (lossy.py once did
    `CODECS.update(...)`, so lossy chunks decoded only after something had imported it)."""
    tables = {"CODECS", "_TABLE"}
    writes_to = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__"}
    for path in sorted(CODECS_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "register", f"{path.name}:{node.lineno} registers a codec"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target = node.func.value
                writes = isinstance(target, ast.Name) and target.id in tables and node.func.attr in writes_to
                assert not writes, f"{path.name}:{node.lineno} writes the codec table"
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
                is_table = isinstance(node.value, ast.Name) and node.value.id in tables
                assert not is_table or path.name == "registry.py", f"{path.name}:{node.lineno}"  # `register`


def test_the_table_is_read_only_and_an_id_cannot_change_hands() -> None:
    with pytest.raises(TypeError):
        CODECS["zstd"] = Raw  # type: ignore[index]

    @dataclasses.dataclass(frozen=True)
    class Impostor:
        id = "zstd"
        tier = LOSSLESS

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)  # type: ignore[arg-type]
    assert register(Zstd) is Zstd and CODECS["zstd"] is Zstd  # registering again is harmless


def test_unknown_ids_and_bad_params_are_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown codec 'lzma'; known: .*int8"):
        make_codec("lzma", {})
    with pytest.raises(InvalidArgument, match="bad parameters for codec 'int8'"):
        make_codec("int8", {"bits": 3})
    with pytest.raises(InvalidArgument, match="not a lossy tier"):
        lossy_codec("zstd", "F32", 64)


@pytest.mark.parametrize("codec", sample_codecs(), ids=lambda codec: codec.id)
def test_every_codec_is_a_frozen_value_rebuilt_from_its_stored_params(codec: codecs.Codec) -> None:
    assert dataclasses.is_dataclass(codec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        codec.level = 9  # type: ignore[misc]
    assert make_codec(codec.id, codec_params(codec)) == codec


@pytest.mark.parametrize("codec", sample_codecs(), ids=lambda codec: codec.id)
@pytest.mark.parametrize("delta", [-256, 256])  # a whole 64-element block of float32
def test_decode_into_checks_the_size_before_writing(codec: codecs.Codec, delta: int) -> None:
    raw = VALUES.tobytes()
    payload = codec.encode(memoryview(raw))
    out = bytearray(b"\xa5" * (len(raw) + delta))
    with pytest.raises(DecodeError):
        codec.decode_into(payload, memoryview(out))
    assert out == b"\xa5" * len(out)  # nothing written


@pytest.mark.parametrize("codec", sample_codecs(), ids=lambda codec: codec.id)
def test_one_chunk_path_keys_every_tier_by_what_its_chunk_decodes_to(codec: codecs.Codec) -> None:
    raw = VALUES.tobytes()
    chunk = prepare_chunk(codec, raw)
    assert chunk.key == chunk_key(chunk.decoded) and chunk.raw_len == len(raw)
    assert decode_chunk(chunk.key, chunk.stored_value(), len(raw)) == chunk.decoded
    if is_lossy(codec):
        assert chunk.decoded != raw
        assert chunk.stored_value() == chunk_value(codec, codec.encode(memoryview(raw)))
    else:
        assert chunk.decoded == raw
        assert chunk.stored_value() == encode_chunk(codec, memoryview(raw))


def test_a_lossless_chunk_that_does_not_shrink_is_kept_raw_and_a_lossy_one_never() -> None:
    noise = np.random.default_rng(3).integers(0, 256, 1 << 12, dtype=np.uint8).tobytes()
    assert encode_chunk(Zstd(), memoryview(noise)) == chunk_value(Raw(), noise)
    assert len(encode_chunk(Zstd(), memoryview(noise))) == raw_value_len(len(noise))
    tiny = np.float32([0.5, -0.25]).tobytes()  # its int8 payload outgrows 8 bytes
    assert len(lossy_codec("int8", "F32", 64).encode(memoryview(tiny))) >= len(tiny)
    assert encode_chunk(lossy_codec("int8", "F32", 64), memoryview(tiny)).startswith(b"\xc1")
    value = encode_chunk(lossy_codec("int8", "F32", 64), memoryview(tiny))
    assert b"int8" in value and len(value) != raw_value_len(len(tiny))


def test_error_is_measured_in_float64_against_the_original() -> None:
    original = VALUES
    decoded = (original + np.float32(0.001) * np.sign(original)).astype(np.float32)
    measured = measure_error(original.tobytes(), decoded.tobytes(), "F32")
    difference = decoded.astype(np.float64) - original.astype(np.float64)
    assert measured.max_abs == pytest.approx(np.abs(difference).max(), rel=1e-12)
    expected = np.linalg.norm(difference) / np.linalg.norm(original.astype(np.float64))
    assert measured.rel_frobenius == pytest.approx(expected, rel=1e-12)


def test_error_over_chunks_is_the_error_of_the_whole() -> None:
    codec = lossy_codec("int4", "F32", 64)
    raw = VALUES.tobytes()
    _, decoded = codec.encode_with_decoded(memoryview(raw))
    meter = ErrorMeter("F32")
    for start in range(0, len(raw), 1000):
        meter.add(raw[start : start + 1000], decoded[start : start + 1000])
    whole = measure_error(raw, decoded, "F32")
    assert meter.result().max_abs == whole.max_abs
    assert meter.result().rel_frobenius == pytest.approx(whole.rel_frobenius, rel=1e-12)
    assert 0 < whole.rel_frobenius < 0.15


def test_error_of_an_all_zero_original() -> None:
    zeros = bytes(64)
    assert measure_error(zeros, zeros, "F16") == codecs.ErrorMeasure(0.0, 0.0)
    assert measure_error(zeros, np.float16([1.0] * 32).tobytes(), "F16").rel_frobenius == math.inf
    with pytest.raises(ValueError, match="decoded chunk holds"):
        measure_error(zeros, zeros[:-2], "F16")


def test_a_chunk_decodes_in_a_fresh_interpreter_that_imported_only_the_chunk_module(tmp_path: Path) -> None:
    """Whatever a program imports first, a stored lossy chunk finds its codec: here only
    `blockstore.core.chunks`, nothing that chooses tiers (policy) or packs."""
    raw = VALUES.tobytes()
    values = {tier: prepare_chunk(lossy_codec(tier, "F32", 64), raw) for tier in lossy_ids()}
    for tier, chunk in values.items():
        (tmp_path / f"{tier}.value").write_bytes(chunk.stored_value())
        (tmp_path / f"{tier}.decoded").write_bytes(chunk.decoded)
    script = f"""
import sys
from pathlib import Path
from blockstore.core.chunks import decode_chunk
from blockstore.core.hashing import chunk_key
folder = Path({str(tmp_path)!r})
for tier in {sorted(values)!r}:
    decoded = (folder / f"{{tier}}.decoded").read_bytes()
    value = (folder / f"{{tier}}.value").read_bytes()
    assert decode_chunk(chunk_key(decoded), value, {len(raw)}) == decoded, tier
loaded = sorted(name for name in sys.modules if name.startswith("blockstore."))
assert "blockstore.core.policy" not in loaded and "blockstore.ops.pack" not in loaded, loaded
print("decoded", len({sorted(values)!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "decoded 3"


def test_a_lossy_chunk_read_at_the_wrong_length_is_corrupt() -> None:
    """Within its last block a lossy payload cannot tell the length; the key check does."""
    chunk = prepare_chunk(lossy_codec("int8", "F32", 64), VALUES.tobytes())
    with pytest.raises(ChunkCorrupt):
        decode_chunk(chunk.key, chunk.stored_value(), chunk.raw_len - 4)

"""pack → export is byte-identical for every dtype, shape and chunking edge case."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockstore.core.chunks import chunk_ranges
from blockstore.ops.export import export
from blockstore.ops.pack import CODEC_CHOICES, pack
from blockstore.repo import Repository

from .helpers import ALL_DTYPES, RawTensor, random_tensor, write_raw_file, write_safetensors


def roundtrip(repo: Repository, source: Path, out: Path, **options: object) -> bytes:
    result = pack(repo, [source], **options)
    export(repo, result.snapshot_id, out)
    return out.read_bytes()


# Elements per whole byte group for sub-byte dtypes: a last axis of this size always fills whole bytes
# (and the reference writer wants an even last axis for F4).
UNIT_ELEMENTS = {"F4": 2, "F6_E2M3": 4, "F6_E3M2": 4}


def shape_for(dtype: str, rows: int) -> tuple[int, ...]:
    """A 2-D shape valid for every dtype, sub-byte ones included."""
    return (rows, UNIT_ELEMENTS.get(dtype, 1) * 3)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("codec", CODEC_CHOICES)
def test_every_dtype_round_trips_byte_identical(
    tmp_path: Path, repo: Repository, dtype: str, codec: str
) -> None:
    tensors = {
        "matrix": random_tensor(dtype, shape_for(dtype, 37), seed=1),
        "vector": random_tensor(dtype, (shape_for(dtype, 1)[1] * 5,), seed=2),
        "empty": RawTensor(dtype, (0, 4), b""),
    }
    source = write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt", "dtype": dtype})
    assert (
        roundtrip(repo, source, tmp_path / "out.safetensors", codec=codec, chunk_size=64)
        == source.read_bytes()
    )


def test_scalars_and_empty_tensors(tmp_path: Path, repo: Repository) -> None:
    tensors = {
        "scalar_f32": random_tensor("F32", ()),
        "scalar_bool": RawTensor("BOOL", (), b"\x01"),
        "empty_1d": RawTensor("BF16", (0,), b""),
        "empty_3d": RawTensor("I64", (3, 0, 2), b""),
        "weights": random_tensor("F16", (10, 10)),
    }
    source = write_safetensors(tmp_path / "model.safetensors", tensors)
    assert roundtrip(repo, source, tmp_path / "out.safetensors") == source.read_bytes()


def test_file_with_only_empty_tensors_and_no_tensors(tmp_path: Path, repo: Repository) -> None:
    only_empty = write_safetensors(tmp_path / "a.safetensors", {"e": RawTensor("F32", (0,), b"")})
    assert roundtrip(repo, only_empty, tmp_path / "a.out") == only_empty.read_bytes()
    nothing = write_safetensors(tmp_path / "b.safetensors", {}, {"note": "no tensors at all"})
    assert roundtrip(repo, nothing, tmp_path / "b.out") == nothing.read_bytes()


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 16, 17])
def test_tensors_on_and_around_chunk_boundaries(tmp_path: Path, repo: Repository, rows: int) -> None:
    # 8 rows of 16 F32 = 512 bytes = exactly one 512-byte chunk; 7/9/16/17 rows straddle boundaries.
    tensors = {"w": random_tensor("F32", (rows, 16), seed=rows)}
    source = write_safetensors(tmp_path / "model.safetensors", tensors)
    result = pack(repo, [source], chunk_size=512)
    assert result.total_chunks == math.ceil(rows / 8)
    export(repo, result.snapshot_id, tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == source.read_bytes()


def test_rows_never_split_when_a_row_fits() -> None:
    # A row of 3 F32 is 12 bytes; 64-byte chunks hold 5 whole rows (60 bytes), never 5.33.
    ranges = chunk_ranges("F32", (11, 3), 11 * 12, 64)
    assert ranges == [(0, 60), (60, 120), (120, 132)]
    # A row larger than a chunk falls back to whole elements.
    assert chunk_ranges("F64", (2, 100), 1600, 100)[0] == (0, 96)
    # Sub-byte dtypes cut on whole bytes holding whole elements (F6: 4 values in 3 bytes).
    assert all(start % 3 == 0 for start, _ in chunk_ranges("F6_E2M3", (64,), 48, 10))


@st.composite
def safetensors_models(draw: st.DrawFn) -> tuple[dict[str, RawTensor], dict[str, str] | None]:
    names = draw(st.lists(st.text("abcdefghij._", min_size=1, max_size=12), unique=True, max_size=6))
    tensors = {}
    for index, name in enumerate(names):
        dtype = draw(st.sampled_from(ALL_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3)))
        if dtype in UNIT_ELEMENTS:
            shape = (*shape, UNIT_ELEMENTS[dtype])
        tensors[name] = random_tensor(dtype, shape, seed=index)
    # min_size=1: safetensors 0.8's writer emits an invalid header for {} tensors + {} metadata.
    metadata = draw(
        st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=20), min_size=1, max_size=3)
    )
    return tensors, metadata


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=safetensors_models(), chunk_size=st.sampled_from([64, 100, 4096]))
def test_generated_files_round_trip(tmp_path_factory: pytest.TempPathFactory, model, chunk_size: int) -> None:
    tensors, metadata = model
    work = tmp_path_factory.mktemp("gen")
    source = write_safetensors(work / "model.safetensors", tensors, metadata)
    store = work / "store"
    with Repository.init(store) as repo:
        assert roundtrip(repo, source, work / "out.safetensors", chunk_size=chunk_size) == source.read_bytes()


def test_header_length_that_starts_like_pickle_magic(tmp_path: Path, repo: Repository) -> None:
    """Found by Hypothesis: a 640-byte header's length prefix begins 0x80 0x02, pickle's opcode."""
    header = b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}'
    source = write_raw_file(tmp_path / "model.safetensors", header + b" " * (640 - len(header)), b"\x01\x02")
    assert source.read_bytes()[:2] == b"\x80\x02"
    assert roundtrip(repo, source, tmp_path / "out.safetensors") == source.read_bytes()

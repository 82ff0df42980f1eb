"""Every user mistake ends in one clear line, a non-zero exit, and an unchanged store."""

from __future__ import annotations

import json
import pickle
import struct
import sys
import unicodedata
from pathlib import Path

import lmdb
import pytest

from blockstore.core.manifests import control_character
from blockstore.repo import Repository

from .helpers import RawTensor, assert_one_line_error, cli, random_tensor, write_raw_file, write_safetensors


def store_state(path: Path) -> tuple:
    with Repository.open(path, readonly=True) as repo:
        return (repo.store.refs(), sorted(repo.store.snapshot_ids()), sorted(repo.store.iter_keys()))


@pytest.fixture
def packed_store(tmp_path: Path, store_path: Path) -> Path:
    """A store already holding one snapshot, so 'unchanged' means something."""
    good = write_safetensors(tmp_path / "good.safetensors", {"w": random_tensor("F32", (8, 8))})
    assert cli("pack", good, "--store", store_path).exit_code == 0
    return store_path


def tensor_header(**tensors: tuple[str, list[int], list[int]]) -> dict:
    return {name: {"dtype": d, "shape": s, "data_offsets": o} for name, (d, s, o) in tensors.items()}


class _Exploit:
    """Unpickling this creates a marker file: proof that something ran pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


BAD_FILES = {
    "truncated": (
        lambda p: write_raw_file(p, tensor_header(w=("F32", [4], [0, 16])), b"\0" * 10),
        "cover 16 bytes of data but the file holds 10",
    ),
    "header-longer-than-file": (
        lambda p: write_raw_file(p, b'{"a":1}', header_len=10_000),
        "header length 10000 is larger than the file",
    ),
    "huge-header-length": (lambda p: write_raw_file(p, b"{}", header_len=2**63), "exceeds the 100 MB limit"),
    "too-short": (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
    "invalid-json": (lambda p: write_raw_file(p, b'{"w": {"dtype": "F32",'), "not valid JSON"),
    "not-an-object": (lambda p: write_raw_file(p, b"[1, 2]"), "does not start with '{'"),
    "duplicate-key": (
        lambda p: write_raw_file(
            p,
            b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            b"\0",
        ),
        "duplicate key 'w'",
    ),
    "overlap": (
        lambda p: write_raw_file(p, tensor_header(a=("U8", [4], [0, 4]), b=("U8", [4], [2, 6])), b"\0" * 6),
        "tensor 'b' starts at 2, expected 4 (overlaps",
    ),
    "gap": (
        lambda p: write_raw_file(p, tensor_header(a=("U8", [4], [0, 4]), b=("U8", [4], [6, 10])), b"\0" * 10),
        "leaves a gap",
    ),
    "out-of-range": (
        lambda p: write_raw_file(p, tensor_header(a=("U8", [4], [0, 4]), b=("U8", [4], [4, 8])), b"\0" * 5),
        "tensors cover 8 bytes of data but the file holds 5",
    ),
    "size-mismatch": (
        lambda p: write_raw_file(p, tensor_header(a=("F32", [4], [0, 12])), b"\0" * 12),
        "needs 16 bytes for F32[4] but data_offsets span 12",
    ),
    "reversed-offsets": (
        lambda p: write_raw_file(p, tensor_header(a=("U8", [0], [4, 0])), b"\0" * 4),
        "end before they begin",
    ),
    "unknown-dtype": (
        lambda p: write_raw_file(p, tensor_header(a=("F128", [1], [0, 16])), b"\0" * 16),
        "tensor 'a' has unknown dtype 'F128'",
    ),
    "negative-shape": (
        lambda p: write_raw_file(p, tensor_header(a=("U8", [-1], [0, 0]))),
        "invalid shape [-1]",
    ),
    "bad-metadata": (
        lambda p: write_raw_file(p, {"__metadata__": {"n": 1}}),
        "__metadata__ must map strings to strings",
    ),
    "escape-in-name": (
        lambda p: write_raw_file(p, tensor_header(**{"w\x1b[2J": ("U8", [1], [0, 1])}), b"\0"),
        "has a control character (U+001B) in its name",
    ),
    "c1-control-in-name": (
        lambda p: write_raw_file(p, tensor_header(**{"w\x9b": ("U8", [1], [0, 1])}), b"\0"),
        "has a control character (U+009B) in its name",
    ),
}


def test_control_characters_are_exactly_unicode_category_cc() -> None:
    cc = [point for point in range(sys.maxunicode + 1) if unicodedata.category(chr(point)) == "Cc"]
    found = [point for point in range(sys.maxunicode + 1) if control_character(f"a{chr(point)}b")]
    assert found == cc


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_safetensors_is_refused(tmp_path: Path, packed_store: Path, case: str) -> None:
    make, expected = BAD_FILES[case]
    bad = tmp_path / f"{case}.safetensors"
    make(bad)
    before = store_state(packed_store)
    result = cli("pack", bad, "--store", packed_store)
    assert_one_line_error(result, str(bad), expected, exit_code=2)
    assert store_state(packed_store) == before


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_pickle_checkpoints_are_refused_never_unpickled(
    tmp_path: Path, packed_store: Path, name: str
) -> None:
    marker = tmp_path / "unpickled"
    bad = tmp_path / name
    bad.write_bytes(pickle.dumps(_Exploit(marker), protocol=4))
    before = store_state(packed_store)
    result = cli("pack", bad, "--store", packed_store)
    assert_one_line_error(result, "pickle-based checkpoint", "never unpickles")
    assert not marker.exists()
    assert store_state(packed_store) == before


def test_one_bad_shard_writes_nothing(tmp_path: Path, packed_store: Path) -> None:
    good = write_safetensors(tmp_path / "a.safetensors", {"x": random_tensor("BF16", (64, 64), seed=9)})
    bad = write_raw_file(tmp_path / "b.safetensors", b"{not json")
    before = store_state(packed_store)
    assert_one_line_error(cli("pack", good, bad, "--store", packed_store), "b.safetensors")
    assert store_state(packed_store) == before


def test_duplicate_tensor_across_shards(tmp_path: Path, packed_store: Path) -> None:
    a = write_safetensors(tmp_path / "a.safetensors", {"x": random_tensor("U8", (4,))})
    b = write_safetensors(tmp_path / "b.safetensors", {"x": random_tensor("U8", (4,))})
    assert_one_line_error(cli("pack", a, b, "--store", packed_store), "tensor 'x' appears in both")


def test_missing_input_file(tmp_path: Path, packed_store: Path) -> None:
    assert_one_line_error(cli("pack", tmp_path / "nope.safetensors", "--store", packed_store), "no such file")


@pytest.mark.parametrize(
    "args",
    [
        ("pack", "{model}", "--store", "{missing}"),
        ("export", "{missing}", "{out}"),
        ("ls", "{missing}"),
        ("show", "{missing}"),
        ("stats", "{missing}"),
        ("verify", "{missing}"),
    ],
)
def test_missing_store(tmp_path: Path, args: tuple[str, ...]) -> None:
    model = write_safetensors(tmp_path / "m.safetensors", {"w": RawTensor("U8", (1,), b"\0")})
    missing = tmp_path / "no-store"
    values = {"model": model, "missing": missing, "out": tmp_path / "out.safetensors"}
    result = cli(*(a.format(**values) for a in args))
    assert_one_line_error(result, f"no blockstore at {missing}", exit_code=3)
    assert not missing.exists() and not (tmp_path / "out.safetensors").exists()


def test_store_of_another_format_version(tmp_path: Path, store_path: Path) -> None:
    env = lmdb.open(str(store_path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"blockstore-lmdb/99", db=env.open_db(b"meta", txn=txn))
    env.close()
    result = cli("ls", store_path)
    expected = "reads blockstore-lmdb/1 or blockstore-lmdb/2"
    assert_one_line_error(result, "has format 'blockstore-lmdb/99'", expected)


def test_init_refuses_an_existing_store_and_a_bad_chunk_size(tmp_path: Path, store_path: Path) -> None:
    assert_one_line_error(cli("init", store_path), "already exists")
    assert_one_line_error(cli("init", tmp_path / "new", "--chunk-size", "3"), "chunk size 3")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command", ["export", "show", "verify"])
def test_ref_that_does_not_exist(tmp_path: Path, packed_store: Path, command: str) -> None:
    args = [command, f"{packed_store}@nope"] + ([tmp_path / "out"] if command == "export" else [])
    result = cli(*args)
    assert_one_line_error(result, "ref 'nope' does not exist", exit_code=3)
    assert not (tmp_path / "out").exists()


def test_invalid_ref_name_codec_and_chunk_size(tmp_path: Path, packed_store: Path) -> None:
    model = write_safetensors(tmp_path / "m.safetensors", {"w": random_tensor("U8", (4,))})
    before = store_state(packed_store)
    assert_one_line_error(cli("pack", model, "-s", packed_store, "--ref", "-bad"), "invalid ref name")
    assert_one_line_error(cli("pack", model, "-s", packed_store, "--codec", "lzma"), "unknown codec 'lzma'")
    assert_one_line_error(cli("pack", model, "-s", packed_store, "--chunk-size", "3"), "chunk size 3")
    assert_one_line_error(cli("pack", model, "-s", packed_store, "--level", "99"), "zstd level 99")
    assert store_state(packed_store) == before


def test_unknown_tensor_in_show(packed_store: Path) -> None:
    assert_one_line_error(cli("show", packed_store, "nope"), "tensor 'nope' is not in snapshot", exit_code=3)


def test_header_checks_match_the_reference_reader(tmp_path: Path) -> None:
    """Files our reader accepts are ones safetensors itself loads (guards against a too-lax reader)."""
    from safetensors.numpy import load_file

    path = write_safetensors(tmp_path / "ok.safetensors", {"a": random_tensor("F16", (3, 5))}, {"k": "v"})
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8 : 8 + length])["__metadata__"] == {"k": "v"}
    assert load_file(str(path))["a"].shape == (3, 5)


def test_output_into_a_missing_directory(tmp_path: Path, packed_store: Path) -> None:
    out = tmp_path / "missing" / "out.safetensors"
    assert_one_line_error(cli("export", packed_store, out), f"directory {out.parent} does not exist")
    assert not out.parent.exists()

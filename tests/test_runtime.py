"""The lazy runtime on plain tensors: exact bytes, row lookups, budget, prefetch, threads, damage."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from blockstore import runtime
from blockstore.errors import InvalidArgument, RefNotFound, TensorCorrupt, UnsupportedInput
from blockstore.ops.pack import pack
from blockstore.repo import Repository
from blockstore.runtime.lazy import TORCH_DTYPES

from .helpers import ALL_DTYPES, RawTensor, cli, random_tensor, write_safetensors
from .test_corruption import edit_chunks
from .test_roundtrip import shape_for


def test_gc_keeps_a_pinned_snapshot_until_its_reader_closes(table, tmp_path: Path) -> None:
    store, raw = table
    newer = write_safetensors(
        tmp_path / "newer.safetensors", {"embed_tokens.weight": random_tensor("F32", (1000, 64), seed=99)}
    )
    with runtime.open(store) as state:
        pinned = state.snapshot_id.hex()
        assert cli("pack", newer, "--store", store).exit_code == 0
        collected = cli("gc", store, "--keep", "0", "--json").json()
        assert collected["deleted_snapshots"] == [] and collected["kept_snapshots"] == 2
        assert same(state["embed_tokens.weight"].materialize(), reference_rows(raw))
        leases = cli("doctor", store, "--json").json()["leases"]
        assert [(lease["role"], lease["stale"]) for lease in leases] == [(f"reader of {pinned[:12]}", False)]
    assert cli("gc", store, "--keep", "0", "--json").json()["deleted_snapshots"] == [pinned]
    assert cli("doctor", store, "--json").json()["leases"] == []


def packed(store: Path, tmp_path: Path, tensors: dict[str, RawTensor], chunk_size: int = 4096) -> Path:
    source = write_safetensors(tmp_path / "model.safetensors", tensors)
    with Repository.open(store) as repo:
        pack(repo, [source], chunk_size=chunk_size)
    return store


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bitwise equality (random bytes hold NaNs, which torch.equal never calls equal)."""
    return actual.shape == expected.shape and as_bytes(actual) == as_bytes(expected)


@pytest.fixture
def table(store_path: Path, tmp_path: Path) -> tuple[Path, RawTensor]:
    """A 1000x64 F32 'embedding' table (static) cut into 16-row chunks, and a small norm (dynamic)."""
    tensors = {
        "embed_tokens.weight": random_tensor("F32", (1000, 64), seed=3),
        "layers.0.mlp.up.weight": random_tensor("BF16", (256, 256), seed=4),
        "layers.1.mlp.up.weight": random_tensor("BF16", (256, 256), seed=5),
        "layers.2.mlp.up.weight": random_tensor("BF16", (256, 256), seed=6),
        "norm.weight": random_tensor("F32", (64,), seed=7),
    }
    return packed(store_path, tmp_path, tensors), tensors["embed_tokens.weight"]


def reference_rows(raw: RawTensor) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw.data), dtype=torch.float32).reshape(raw.shape)


@pytest.mark.parametrize("dtype", [d for d in ALL_DTYPES if d in TORCH_DTYPES])
def test_every_torch_dtype_materializes_byte_identical(store_path: Path, tmp_path: Path, dtype: str) -> None:
    tensors = {
        "matrix": random_tensor(dtype, shape_for(dtype, 37), seed=1),
        "scalar": random_tensor(dtype, (), seed=2),
        "empty": RawTensor(dtype, (0, 4), b""),
    }
    with runtime.open(packed(store_path, tmp_path, tensors, chunk_size=64)) as state:
        for name, raw in tensors.items():
            tensor = state[name].materialize()
            assert tensor.dtype == TORCH_DTYPES[dtype] and tuple(tensor.shape) == raw.shape
            assert as_bytes(tensor) == raw.data, name


@pytest.mark.parametrize("chunk_size", [4096, 1 << 20], ids=["many-chunks", "one-chunk-each"])
def test_load_all_is_a_plain_dict_of_exact_tensors(store_path: Path, tmp_path: Path, chunk_size: int) -> None:
    tensors = {f"layers.{n}.mlp.up.weight": random_tensor("BF16", (64, 128), seed=n) for n in range(6)}
    tensors["embed_tokens.weight"] = random_tensor("F32", (1000, 64), seed=9)
    tensors["norm.weight"] = random_tensor("F32", (64,), seed=10)
    with runtime.open(packed(store_path, tmp_path, tensors, chunk_size=chunk_size)) as state:
        subset = ["norm.weight", "layers.3.mlp.up.weight"]
        assert list(state.load_all(subset)) == subset
        loaded = state.load_all()
        assert list(loaded) == list(state)
        for name, raw in tensors.items():
            assert as_bytes(loaded[name]) == raw.data and tuple(loaded[name].shape) == raw.shape, name
        stats = state.stats()
        assert stats.misses == len(tensors) and stats.hits == len(subset)  # each decoded once
        assert stats.bytes_decoded == sum(len(raw.data) for raw in tensors.values())


def test_decode_threads_outlive_one_open(table) -> None:
    """Their zstd contexts and scratch buffers are kept for the next open, not rebuilt."""
    store, _ = table

    def decode_threads() -> set[int | None]:
        named = (thread for thread in threading.enumerate() if thread.name.startswith("blockstore-decode-3"))
        return {thread.ident for thread in named}

    with runtime.open(store, workers=3) as first:
        first.load_all()
    threads = decode_threads()
    with runtime.open(store, workers=3) as second:
        second.load_all()
    # The executor starts threads as work first needs them, so the second open may add one; none
    # of the first open's threads may have ended.
    assert threads and threads <= decode_threads()


@pytest.mark.parametrize("dtype", ["F4", "F6_E2M3"])
def test_dtype_without_torch_equivalent_is_refused(store_path: Path, tmp_path: Path, dtype: str) -> None:
    store = packed(store_path, tmp_path, {"packed4": random_tensor(dtype, shape_for(dtype, 4))})
    with runtime.open(store) as state:
        assert state["packed4"].shape == torch.Size(shape_for(dtype, 4))
        with pytest.raises(UnsupportedInput, match=f"packed4.*{dtype}"):
            state["packed4"].materialize()


def test_open_reads_no_chunk_and_knows_metadata(table) -> None:
    store, raw = table
    with runtime.open(store) as state:
        tensor = state["embed_tokens.weight"]
        assert (tensor.dtype, tensor.shape, tensor.side) == (torch.float32, torch.Size(raw.shape), "static")
        assert state["norm.weight"].side == "dynamic"
        assert len(state) == 5 and "norm.weight" in state
        assert state.stats().chunks_read == 0
        with pytest.raises(KeyError, match="nope"):
            state["nope"]


def test_row_lookup_decodes_only_the_chunks_holding_the_rows(table) -> None:
    store, raw = table
    expected = reference_rows(raw)
    with runtime.open(store) as state:
        tensor = state["embed_tokens.weight"]
        ids = torch.tensor([3, 999, 5, 3])
        assert same(tensor.index_select(ids), expected[ids])
        stats = state.stats()
        assert stats.chunks_read == 2  # rows 3 and 5 share a chunk; 999 is in the last one
        assert stats.bytes_decoded < raw_bytes(raw) / 20
        assert same(tensor[7], expected[7])
        assert same(tensor[-1], expected[-1])
        assert same(tensor[10:40:3], expected[10:40:3])
        assert same(tensor[[0, -2]], expected[[0, -2]])
        assert same(tensor[:, 5], expected[:, 5])  # not a row index: materializes
        with pytest.raises(IndexError, match=r"embed_tokens\.weight"):
            tensor.index_select(torch.tensor([1000]))


def raw_bytes(raw: RawTensor) -> int:
    return len(raw.data)


def test_rows_that_span_chunks_fall_back_to_the_whole_tensor(store_path: Path, tmp_path: Path) -> None:
    raw = random_tensor("F32", (4, 100), seed=8)  # 400-byte rows, 64-byte chunks
    with runtime.open(packed(store_path, tmp_path, {"wide": raw}, chunk_size=64)) as state:
        assert same(state["wide"][[2, 0]], reference_rows(raw)[[2, 0]])


def test_hits_misses_and_dynamic_tensors_stay_resident(table) -> None:
    store, _ = table
    with runtime.open(store, budget=0) as state:
        first = state["norm.weight"].materialize()
        assert state["norm.weight"].materialize() is first
        state["layers.0.mlp.up.weight"].materialize()
        state["layers.1.mlp.up.weight"].materialize()
        stats = state.stats()
        assert (stats.misses, stats.hits) == (3, 1)
        assert stats.evictions == 1  # budget 0: only the newest static tensor is kept
        assert stats.resident_bytes == 64 * 4 and stats.cached_bytes == 256 * 256 * 2
        assert state["norm.weight"].materialize() is first  # never evicted


def test_budget_evicts_the_coldest_static_tensor(table) -> None:
    store, _ = table
    names = [f"layers.{i}.mlp.up.weight" for i in range(3)]
    with runtime.open(store, budget="300KB") as state:  # room for two 128 KiB tensors
        for name in names[:2]:
            state[name].materialize()
        state[names[0]].materialize()  # layer 0 is now warmer than layer 1
        state[names[2]].materialize()  # evicts layer 1
        before = state.stats()
        state[names[0]].materialize()
        assert state.stats().hits == before.hits + 1
        state[names[1]].materialize()
        after = state.stats()
        assert after.evictions == 2 and after.misses == before.misses + 1
        assert after.cached_bytes <= 300_000 and after.peak_cached_bytes <= 300_000 + 256 * 256 * 2


def test_prefetch_decodes_the_next_layer_in_the_background(table) -> None:
    store, _ = table
    with runtime.open(store, prefetch=1) as state:
        state["layers.0.mlp.up.weight"].materialize()
        state.wait_for_prefetch()
        assert state.stats().prefetched == 1
        state["layers.1.mlp.up.weight"].materialize()
        assert state.stats().hits == 1 and state.stats().misses == 1


def test_four_threads_materializing_overlapping_tensors_agree(table) -> None:
    store, _ = table
    names = ["embed_tokens.weight", "layers.0.mlp.up.weight", "layers.1.mlp.up.weight", "norm.weight"]
    with runtime.open(store) as eager:
        expected = {name: as_bytes(eager[name].materialize()) for name in names}
    results: list[dict[str, bytes]] = []
    errors: list[BaseException] = []
    with runtime.open(store, budget="200KB", workers=4) as state:
        barrier = threading.Barrier(4)

        def work(offset: int) -> None:
            try:
                barrier.wait()
                order = names[offset:] + names[:offset]
                results.append({name: as_bytes(state[name].materialize()) for name in order * 3})
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert state.stats().evictions > 0
    assert not errors and len(results) == 4
    assert all(result == expected for result in results)


def test_missing_ref_and_bad_arguments_are_clear_errors(table) -> None:
    store, _ = table
    with pytest.raises(RefNotFound, match="'v9'"):
        runtime.open(store, "v9")
    with pytest.raises(InvalidArgument, match="budget"):
        runtime.open(store, budget="lots")
    with pytest.raises(InvalidArgument, match="device"):
        runtime.open(store, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="CUDA is not available"):
            runtime.open(store, device="cuda")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GB", 2_000_000_000), ("512MiB", 512 << 20), ("1.5k", 1500), (1000, 1000), (None, None)],
)
def test_parse_size(text, expected) -> None:
    assert runtime.parse_size(text) == expected


def test_corrupt_chunk_is_named_on_access_and_no_tensor_returned(table) -> None:
    store, _ = table
    with Repository.open(store) as repo:
        entry = repo.snapshot(repo.resolve("main")).tensors["layers.1.mlp.up.weight"]

    def flip(txn, db):
        value = bytearray(txn.get(entry.chunks[-1].key, db=db))
        value[-1] ^= 0x01
        txn.put(entry.chunks[-1].key, bytes(value), db=db)

    edit_chunks(store, flip)
    with runtime.open(store) as state:
        with pytest.raises(TensorCorrupt, match=r"'layers\.1\.mlp\.up\.weight'.*corrupt"):
            state["layers.1.mlp.up.weight"].materialize()
        with pytest.raises(TensorCorrupt):  # a failed decode is not cached
            state["layers.1.mlp.up.weight"].materialize()
        with pytest.raises(TensorCorrupt, match=r"'layers\.1\.mlp\.up\.weight'"):
            state.load_all()
        state["layers.0.mlp.up.weight"].materialize()  # undamaged tensors still load


def test_reader_keeps_its_snapshot_while_a_writer_packs_a_new_version(table, tmp_path: Path) -> None:
    store, raw = table
    (tmp_path / "newer").mkdir()
    newer = write_safetensors(
        tmp_path / "newer" / "model.safetensors",
        {"embed_tokens.weight": random_tensor("F32", (1000, 64), seed=99)},
    )
    with runtime.open(store) as state:
        # A separate process writes, as a publisher would.
        subprocess.run(
            [Path(sys.executable).with_name("blockstore"), "pack", "-s", store, newer],
            check=True,
            capture_output=True,
        )
        assert same(state["embed_tokens.weight"].materialize(), reference_rows(raw))
        assert "norm.weight" in state
    with runtime.open(store) as fresh:
        assert "norm.weight" not in fresh

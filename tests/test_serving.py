"""The engine-neutral half of serving: streaming under a memory cap, loader options, the model
directory an engine starts from, and the weight source (pin, config check, warm). The vLLM half
runs in its own environment (tests/vllm)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb
import pytest
import torch
from safetensors.torch import save_file

from blockstore.core.manifests import TensorEntry
from blockstore.errors import InvalidArgument, ModelMismatch, RefNotFound, TensorCorrupt
from blockstore.ops.pack import pack
from blockstore.repo import Repository
from blockstore.runtime import lazy
from blockstore.runtime.engines.serving import (
    DEFAULT_MEMORY_LIMIT,
    MARKER,
    ServeOptions,
    WeightSource,
    write_model_dir,
)
from blockstore.runtime.stream import StreamReport, snapshot_order, stream_tensors
from blockstore.storage.cache import ReadThroughCache
from tests.helpers import assert_one_line_error, cli, random_tensor, write_safetensors

TOKENIZER_FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}',
    "generation_config.json": b'{"do_sample": false}',
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b"{}",
    "special_tokens_map.json": b"{}",
    "chat_template.jinja": b"{{ messages }}",
}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small multi-dtype model with its config and tokenizer files beside it."""
    directory = tmp_path / "model"
    directory.mkdir()
    generator = torch.Generator().manual_seed(0)

    def weights(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(dtype)

    tensors = {
        "embed.weight": weights((512, 64), torch.bfloat16),
        "layers.0.mlp.weight": weights((256, 64), torch.float32),
        "layers.0.norm.weight": weights((64,), torch.float16),
        "layers.0.attn.q.weight": weights((64, 64), torch.bfloat16),
        "position_ids": torch.arange(32).reshape(1, 32),
        "empty": torch.empty((0, 4)),
    }
    save_file(tensors, directory / "model.safetensors")
    for name, blob in TOKENIZER_FILES.items():
        (directory / name).write_bytes(blob)
    (directory / "README.md").write_text("not packed")
    return directory


@pytest.fixture
def packed(model: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    with Repository.init(store, chunk_size=8192) as repo:
        pack(repo, [model])
    return store


def stream_all(
    store: Path, limit: int, **kwargs: object
) -> tuple[list[tuple[str, torch.Tensor]], StreamReport]:
    report = StreamReport()
    with Repository.open(store) as repo:
        snapshot_id = repo.resolve("main")
        entries = snapshot_order(repo.snapshot(snapshot_id))
        streamed = list(
            stream_tensors(
                repo, snapshot_id, entries, memory_limit=limit, concurrency=2, report=report, **kwargs
            )
        )
    return streamed, report


def test_the_stream_gives_every_tensor_bit_exact_in_file_order(packed: Path) -> None:
    streamed, report = stream_all(packed, DEFAULT_MEMORY_LIMIT)
    with lazy.open(packed) as state:
        expected = state.load_all()
        order = [name for source in state.snapshot.files for name in source.tensors]
    assert [name for name, _ in streamed] == order
    for name, tensor in streamed:
        reference = expected[name]
        assert tensor.dtype == reference.dtype and tensor.shape == reference.shape
        assert tensor.view(torch.uint8).flatten().tolist() == reference.view(torch.uint8).flatten().tolist()
    assert report.tensors == len(order) and report.raw_bytes == sum(t.nbytes for t in expected.values())
    assert report.dequantized == {}


@pytest.mark.parametrize("limit", [1, 20_000, 100_000, 140_000])
def test_the_stream_holds_no_more_than_its_cap_or_two_tensors(packed: Path, limit: int) -> None:
    """Held bytes count a tensor from its allocation until the consumer has moved past it; a
    tensor that does not fit is read alone, beside the one the consumer may still hold."""
    streamed, report = stream_all(packed, limit)
    largest = report.largest_tensor
    assert largest == 512 * 64 * 2
    assert report.peak_held_bytes <= max(limit, 2 * largest)
    if limit >= 2 * largest:
        assert report.peak_held_bytes <= limit
    assert len(streamed) == 6


def test_a_damaged_chunk_stops_the_stream_before_its_tensor_is_handed_out(packed: Path) -> None:
    with Repository.open(packed) as repo:
        entry = repo.snapshot(repo.resolve("main")).tensors["layers.0.mlp.weight"]
    key = entry.chunks[-1].key
    env = lmdb.open(str(packed), max_dbs=8)
    with env.begin(write=True) as txn:
        chunks = env.open_db(b"chunks", txn=txn)
        value = bytearray(txn.get(key, db=chunks))
        value[len(value) // 2] ^= 0x10
        txn.put(key, bytes(value), db=chunks)
    env.close()
    seen = []
    with pytest.raises(TensorCorrupt) as caught, Repository.open(packed) as repo:
        snapshot_id = repo.resolve("main")
        for name, _ in stream_tensors(
            repo, snapshot_id, snapshot_order(repo.snapshot(snapshot_id)), memory_limit=1 << 20, concurrency=2
        ):
            seen.append(name)
    assert "'layers.0.mlp.weight'" in str(caught.value) and key.hex() in str(caught.value)
    assert "layers.0.mlp.weight" not in seen


def test_lossy_tensors_are_dequantized_to_the_engines_dtype_and_counted(model: Path, tmp_path: Path) -> None:
    store = tmp_path / "int8"
    assert cli("init", store).exit_code == 0
    assert (
        cli("pack", "-s", store, "--static-tier", "int8", "--static", "layers.0.mlp.*", model).exit_code == 0
    )
    streamed, report = stream_all(store, DEFAULT_MEMORY_LIMIT, lossy_dtype=torch.bfloat16)
    tensors = dict(streamed)
    with lazy.open(store) as state:
        tiers = {name: state[name].entry.tier for name in state}
        dequantized = state["layers.0.mlp.weight"].materialize()
        exact = state["layers.0.norm.weight"].materialize()
    assert tiers["layers.0.mlp.weight"] == "int8"
    assert report.dequantized == {"int8": sum(tier == "int8" for tier in tiers.values())}
    assert tensors["layers.0.mlp.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["layers.0.mlp.weight"], dequantized.to(torch.bfloat16))
    assert tensors["layers.0.norm.weight"].dtype == torch.float16  # lossless: as stored, bit-exact
    assert torch.equal(tensors["layers.0.norm.weight"], exact)


def test_a_cast_to_a_wider_engine_dtype_counts_against_the_cap(model: Path, tmp_path: Path) -> None:
    store = tmp_path / "int8"
    assert cli("init", store).exit_code == 0
    assert (
        cli("pack", "-s", store, "--static-tier", "int8", "--static", "layers.0.mlp.*", model).exit_code == 0
    )
    plain, _ = stream_all(store, DEFAULT_MEMORY_LIMIT)
    streamed, report = stream_all(store, DEFAULT_MEMORY_LIMIT, lossy_dtype=torch.float64)
    widened = dict(streamed)["layers.0.mlp.weight"]
    assert widened.dtype == torch.float64
    assert torch.equal(widened, dict(plain)["layers.0.mlp.weight"].double())
    # Everything fits under the default cap, so all of it is held at once: without counting what the
    # casts add, the peak could not pass the stored tensors' own size.
    assert report.peak_held_bytes > report.raw_bytes


def test_stream_arguments_are_checked(packed: Path) -> None:
    with Repository.open(packed) as repo:
        sid = repo.resolve("main")
        entries: list[TensorEntry] = snapshot_order(repo.snapshot(sid))
        with pytest.raises(InvalidArgument, match="memory limit"):
            stream_tensors(repo, sid, entries, memory_limit=0, concurrency=1)
        with pytest.raises(InvalidArgument, match="concurrency"):
            stream_tensors(repo, sid, entries, memory_limit=1, concurrency=0)


# options ------------------------------------------------------------------------------------------


def test_options_take_sizes_and_refuse_what_they_do_not_know() -> None:
    options = ServeOptions.parse(
        {"store": "s3://b/p", "ref": "v2", "memory_limit": "256MiB", "concurrency": 16}
    )
    assert options == ServeOptions("s3://b/p", "v2", None, 16, 256 << 20)
    assert ServeOptions.parse(None).memory_limit == DEFAULT_MEMORY_LIMIT
    for bad, fragment in [
        (
            {"stroe": "x"},
            "unknown option(s) stroe (accepted: store, ref, cache_dir, concurrency, memory_limit)",
        ),
        ({"concurrency": 0}, "concurrency must be a positive integer"),
        ({"concurrency": True}, "concurrency must be a positive integer"),
        ({"memory_limit": "lots"}, "is not a size"),
        ({"memory_limit": 0}, "memory_limit must be positive"),
        ({"store": 3}, "store must be a string"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            ServeOptions.parse(bad)
        assert fragment in str(caught.value) and "\n" not in str(caught.value)


# the model directory ------------------------------------------------------------------------------


def test_pack_keeps_the_tokenizer_and_model_dir_writes_it_without_weights(
    packed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "served"
    assert write_model_dir(str(packed), None, out) == out
    assert sorted(p.name for p in out.iterdir()) == sorted([*TOKENIZER_FILES, MARKER])
    for name, blob in TOKENIZER_FILES.items():
        assert (out / name).read_bytes() == blob
    marker = json.loads((out / MARKER).read_bytes())
    with Repository.open(packed) as repo:
        assert marker["snapshot"] == repo.resolve("main").hex()
    assert marker["store"] == str(packed.resolve()) and marker["ref"] == "main"
    assert write_model_dir(str(packed), None, out) == out  # complete already: kept as it is
    assert not list(tmp_path.glob(".served.partial-*"))


def test_model_dir_defaults_to_one_directory_per_snapshot_in_the_cache(
    packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    result = cli("model-dir", packed)
    assert result.exit_code == 0, result.output
    with Repository.open(packed) as repo:
        snapshot_hex = repo.resolve("main").hex()
    made = Path(result.stdout.strip())
    assert made.parent == tmp_path / "xdg" / "blockstore" / "models" and made.name.startswith(
        f"{snapshot_hex}-"
    )
    assert (made / "config.json").is_file()
    as_json = cli("model-dir", "--json", packed)
    assert json.loads(as_json.stdout)["model_dir"] == str(made)  # the same directory, reused
    # The same snapshot read through a cache is another directory: its marker differs.
    assert write_model_dir(str(packed), None, cache_dir=str(tmp_path / "cache")) != made


def test_workers_writing_one_model_dir_at_once_all_get_it_whole(
    packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with ThreadPoolExecutor(8) as pool:
        made = set(pool.map(lambda _: write_model_dir(str(packed)), range(16)))
    assert len(made) == 1
    (directory,) = made
    assert sorted(p.name for p in directory.iterdir()) == sorted([*TOKENIZER_FILES, MARKER])
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]


def test_a_sharded_models_index_stays_out_of_the_model_dir(model: Path, tmp_path: Path) -> None:
    """The model directory holds no weights, so no index pointing at weight files either."""
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    tensors = {"a": torch.ones(4), "b": torch.zeros(4)}
    save_file({"a": tensors["a"]}, sharded / "model-00001-of-00002.safetensors")
    save_file({"b": tensors["b"]}, sharded / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_bytes(TOKENIZER_FILES["config.json"])
    store = tmp_path / "sharded-store"
    with Repository.init(store) as repo:
        pack(repo, [sharded])
        assert "model.safetensors.index.json" in repo.snapshot(repo.resolve("main")).extras
    out = write_model_dir(str(store), None, tmp_path / "served")
    assert sorted(p.name for p in out.iterdir()) == ["blockstore.json", "config.json"]


def test_model_dir_refusals_are_one_line(packed: Path, tmp_path: Path) -> None:
    assert_one_line_error(cli("model-dir", f"{packed}@nope"), "ref 'nope' does not exist", exit_code=3)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    assert_one_line_error(cli("model-dir", packed, "-o", busy), "exists and is not a model directory")
    assert (busy / "mine.txt").read_text() == "keep"
    bare = tmp_path / "bare"
    with Repository.init(bare) as repo:
        write_safetensors(tmp_path / "w.safetensors", {"w": random_tensor("F32", (4,))})
        pack(repo, [tmp_path / "w.safetensors"])
    assert_one_line_error(cli("model-dir", bare), "has no config.json")


# the weight source --------------------------------------------------------------------------------


def test_the_source_loads_the_marker_snapshot_even_after_the_ref_moves(
    packed: Path, model: Path, tmp_path: Path
) -> None:
    served = write_model_dir(str(packed), None, tmp_path / "served")
    with Repository.open(packed) as repo:
        first = repo.resolve("main")
        write_safetensors(model / "model.safetensors", {"w": random_tensor("F32", (4,))})
        (model / "config.json").write_bytes(b'{"architectures": ["Other"]}')
        pack(repo, [model])
        assert repo.resolve("main") != first
    with WeightSource(ServeOptions(), served) as source:
        assert source.snapshot_id == first
        assert len(source.repo.leases()) == 1  # pinned against gc while it loads
    with Repository.open(packed) as repo:
        assert repo.leases() == []
    # Asking for the moved ref explicitly: its config is not the one the engine was built from.
    with pytest.raises(ModelMismatch, match=r"its config\.json differs from"):
        WeightSource(ServeOptions(ref="main"), served)


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("snapshot", "../../etc", "64 lowercase hex digits"),
        ("snapshot", 7, "must be strings"),
        ("cache_dir", 3, "must be strings or null"),
        ("format", 2, "format 2, expected 1"),
    ],
)
def test_a_crafted_marker_is_refused_in_one_line(
    packed: Path, tmp_path: Path, field: str, value: object, fragment: str
) -> None:
    served = write_model_dir(str(packed), None, tmp_path / "served")
    marker = json.loads((served / MARKER).read_bytes())
    marker[field] = value
    (served / MARKER).write_text(json.dumps(marker))
    with pytest.raises(InvalidArgument) as caught:
        WeightSource(ServeOptions(), served)
    assert "not a blockstore model marker" in str(caught.value) and fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_source_refuses_in_one_line_without_a_store_or_with_a_missing_ref(
    packed: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument, match="needs a store"):
        WeightSource(ServeOptions(), tmp_path)
    with pytest.raises(RefNotFound, match="ref 'v9' does not exist"):
        WeightSource(ServeOptions(store=str(packed), ref="v9"), None)


def test_warming_fills_the_read_through_cache_so_a_restart_reads_nothing_remote(
    moto_url: str, packed: Path, tmp_path: Path
) -> None:
    assert cli("init", moto_url).exit_code == 0
    assert cli("push", packed, moto_url).exit_code == 0
    cache = tmp_path / "cache"
    served = tmp_path / "served"
    warmed = cli("--cache", cache, "model-dir", "--warm", "--json", moto_url, "-o", served)
    assert warmed.exit_code == 0, warmed.stderr
    assert json.loads(warmed.stdout)["model_dir"] == str(served)
    assert json.loads((served / MARKER).read_bytes())["cache_dir"] == str(cache.resolve())
    with WeightSource(ServeOptions(), served) as source:
        assert json.loads(warmed.stdout)["warmed"]["chunks"] == len(source.snapshot.chunk_keys())
        before = source.repo.request_counts()["GET"]  # (KeyError if the counts stopped reaching the remote)
        streamed = dict(source.tensors())
        assert source.repo.request_counts()["GET"] == before
    with lazy.open(packed) as state:
        assert all(torch.equal(streamed[name], tensor) for name, tensor in state.load_all().items())


def test_the_command_line_starts_without_torch() -> None:
    """Commands import torch only when they use it (model-dir, check-drift, bench do)."""
    import subprocess
    import sys

    probe = "import sys, blockstore.cli.app; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_cache_takes_its_share_of_the_memory_limit(moto_url: str, packed: Path, tmp_path: Path) -> None:
    """Fetched values waiting for the read-through cache are host memory as well: the stream and
    the cache's writer together stay under `memory_limit`."""
    assert cli("init", moto_url).exit_code == 0
    assert cli("push", packed, moto_url).exit_code == 0
    served = write_model_dir(moto_url, None, tmp_path / "served", cache_dir=str(tmp_path / "cache"))
    limit = 64 << 20
    with WeightSource(ServeOptions(memory_limit=limit), served) as source:
        store = source.repo.store
        assert isinstance(store, ReadThroughCache)
        pending = store._writer.limit
        assert pending == limit // 4 and source.memory_limit + pending == limit
    with WeightSource(
        ServeOptions(memory_limit=limit), write_model_dir(str(packed), None, tmp_path / "local")
    ) as local:
        assert local.memory_limit == limit  # no cache: the whole limit is the stream's

"""Delta chunks: a fine-tune stored as differences against its base model's chunks.

Each test can fail: the round trips compare bytes, the sizes compare against the same model stored
whole, and the damage tests expect the base chunk named (never a wrong tensor)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from blockstore import runtime
from blockstore.benchmarks.deltas import fine_tune
from blockstore.codecs import delta as deltas
from blockstore.core.chunks import decode_chunk, delta_base, delta_value, is_delta_value
from blockstore.core.hashing import chunk_key
from blockstore.core.manifests import Snapshot
from blockstore.errors import BundleRejected, ChunkCorrupt, TensorCorrupt
from blockstore.ops.deltas import delta_summary
from blockstore.ops.export import export
from blockstore.ops.gc import gc
from blockstore.ops.pack import pack
from blockstore.ops.transfer import transfer
from blockstore.ops.verify import verify
from blockstore.patches.apply import apply
from blockstore.patches.bundle import DELTA_VERSION, FORMAT_VERSION, read_bundle
from blockstore.patches.diff import diff
from blockstore.repo import Repository

from .helpers import (
    ALL_DTYPES,
    FUZZ_EXAMPLES,
    assert_one_line_error,
    cli,
    random_tensor,
    sha256,
    write_safetensors,
)

CHUNK = 1 << 16


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {f"layers.{i}.mlp.weight": torch.randn(256, 512, generator=generator) * 0.02 for i in range(3)}
    weights["norm.weight"] = torch.ones(512)
    return {name: tensor.to(torch.bfloat16) for name, tensor in weights.items()}


def _store(path: Path) -> Repository:
    return Repository.init(path, chunk_size=CHUNK)


def _format(repo: Repository) -> bytes:
    with repo.store.env.begin(db=repo.store._dbs["meta"]) as txn:
        return bytes(txn.get(b"format"))


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = _model()
    tuned = fine_tune(base, 1)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    save_file(fine_tune(tuned, 2), tmp_path / "tuned2.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "tuned2.safetensors"


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.sampled_from(deltas.WIDTHS), st.integers(0, 64), st.data())
def test_a_difference_restores_any_bytes_exactly(width: int, count: int, data: st.DataObject) -> None:
    raw = data.draw(st.binary(min_size=count * width, max_size=count * width))
    base = data.draw(st.binary(min_size=count * width, max_size=count * width))
    out = bytearray(deltas.difference(raw, base, width))
    deltas.restore(memoryview(out), base, width)
    assert bytes(out) == raw


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_a_delta_chunk_of_every_dtype_decodes_to_its_bytes(dtype: str) -> None:
    from blockstore.core.dtypes import plane_count

    raw = random_tensor(dtype, (64, 8), seed=1).data
    base = random_tensor(dtype, (64, 8), seed=2).data
    value = delta_value(memoryview(raw), chunk_key(base), base, plane_count(dtype), 3)
    assert is_delta_value(value) and delta_base(value) == chunk_key(base)
    assert (
        bytes(decode_chunk(chunk_key(raw), value, len(raw), base=lambda key, out, difference=None: base))
        == raw
    )


def test_a_fine_tune_packs_as_deltas_and_reads_back_byte_for_byte(models, tmp_path: Path) -> None:
    base, tuned, _ = models
    repo = _store(tmp_path / "store")
    plain = pack(repo, [base])
    assert _format(repo) == b"blockstore-lmdb/2"  # no delta written yet: the store is not upgraded
    result = pack(repo, [tuned])
    assert result.delta_chunks > 0 and result.delta_base == plain.snapshot_id
    assert _format(repo) == b"blockstore-lmdb/3"
    weights = sum(e.stored_bytes for n, e in repo.snapshot(plain.snapshot_id).tensors.items() if "mlp" in n)
    tuned_weights = sum(
        e.stored_bytes for n, e in repo.snapshot(result.snapshot_id).tensors.items() if "mlp" in n
    )
    assert tuned_weights < 0.35 * weights
    export(repo, result.snapshot_id, tmp_path / "out.safetensors")
    assert sha256(tmp_path / "out.safetensors") == sha256(tuned)
    loaded = runtime.open(str(tmp_path / "store")).load_all()
    expected = load_file(tuned)
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    assert verify(repo, deep=True).damages == []
    summary = delta_summary(repo, repo.snapshot(result.snapshot_id))
    assert summary.delta_chunks == result.delta_chunks and summary.bases == {
        plain.snapshot_id: result.delta_chunks
    }


def test_no_base_means_no_deltas(models, tmp_path: Path) -> None:
    base, tuned, _ = models
    repo = _store(tmp_path / "store")
    pack(repo, [base])
    assert pack(repo, [tuned], base=None).delta_chunks == 0
    assert _format(repo) == b"blockstore-lmdb/2"


def test_chains_stay_one_deep(models, tmp_path: Path) -> None:
    base, tuned, tuned2 = models
    repo = _store(tmp_path / "store")
    root = pack(repo, [base]).snapshot_id
    pack(repo, [tuned])
    second = pack(repo, [tuned2]).snapshot_id
    keys = repo.snapshot(second).chunk_keys()
    bases = repo.delta_bases(keys)
    assert bases and set(bases.values()) <= repo.snapshot(root).chunk_keys()
    assert not repo.delta_bases(set(bases.values()))  # no base is itself a delta
    export(repo, second, tmp_path / "out.safetensors")
    assert sha256(tmp_path / "out.safetensors") == sha256(tuned2)


def test_gc_keeps_the_bases_of_kept_deltas(models, tmp_path: Path) -> None:
    base, tuned, _ = models
    repo = _store(tmp_path / "store")
    root = pack(repo, [base]).snapshot_id
    top = pack(repo, [tuned]).snapshot_id
    report = gc(repo, keep=1)
    assert root.hex() in report.deleted_snapshots
    checked = verify(repo, deep=True)
    assert checked.damages == [] and checked.orphans == []  # bases are reached through their deltas
    assert gc(repo, keep=1, dry_run=True).deleted_chunks == 0
    export(repo, top, tmp_path / "out.safetensors")
    assert sha256(tmp_path / "out.safetensors") == sha256(tuned)


def _fine_tune_over_base(models, tmp_path: Path) -> tuple[Repository, Snapshot, bytes]:
    """A store holding the base and the fine-tune (as deltas), the fine-tune's snapshot, and the
    base chunk of one of its deltas."""
    base, tuned, _ = models
    repo = _store(tmp_path / "store")
    pack(repo, [base])
    top = repo.snapshot(pack(repo, [tuned]).snapshot_id)
    return repo, top, next(iter(repo.delta_bases(top.chunk_keys()).values()))


def test_a_missing_base_is_named_never_a_wrong_tensor(models, tmp_path: Path) -> None:
    repo, top, base_key = _fine_tune_over_base(models, tmp_path)
    repo.store.delete_batch([base_key])
    with pytest.raises(TensorCorrupt) as caught:
        export(repo, top.id, tmp_path / "out.safetensors")
    assert base_key.hex() in str(caught.value) and "missing" in str(caught.value)
    assert not (tmp_path / "out.safetensors").exists()
    assert any(base_key.hex() in damage.detail for damage in verify(repo, deep=True).damages)
    quick = verify(repo).damages  # without decoding: the missing base is found by the envelope
    assert any(f"a delta whose base chunk {base_key.hex()} is missing" in damage.detail for damage in quick)


def test_a_damaged_base_is_named(models, tmp_path: Path) -> None:
    repo, _, base_key = _fine_tune_over_base(models, tmp_path)
    other = repo.store.get(next(k for k in repo.chunk_keys() if k != base_key and not repo.delta_bases([k])))
    with repo.store.env.begin(write=True, db=repo.store._dbs["chunks"]) as txn:
        txn.put(base_key, other)  # a whole, decodable value: but not the base's bytes
    damages = verify(repo, deep=True).damages
    assert damages and all("does not hash" in d.detail or base_key.hex() in d.detail for d in damages)
    assert any(base_key.hex() in d.detail and "its base" in d.detail for d in damages)


def test_a_delta_whose_base_is_a_delta_is_damage() -> None:
    raw, middle, root = (np.random.default_rng(seed).bytes(1024) for seed in range(3))
    inner = delta_value(memoryview(middle), chunk_key(root), root, 2, 3)
    outer = delta_value(memoryview(raw), chunk_key(middle), middle, 2, 3)

    def base(
        key: bytes, out: memoryview, difference: object = None
    ) -> bytearray:  # what a store's base reader does: no base for a base
        return decode_chunk(key, inner, len(out))

    with pytest.raises(ChunkCorrupt, match="chains are one deep"):
        decode_chunk(chunk_key(raw), outer, len(raw), base=base)
    selfish = delta_value(memoryview(raw), chunk_key(raw), raw, 2, 3)
    with pytest.raises(ChunkCorrupt, match="against itself"):
        decode_chunk(chunk_key(raw), selfish, len(raw), base=lambda key, out, difference=None: raw)


def test_a_bundle_ships_deltas_when_the_receiver_holds_the_base(models, tmp_path: Path) -> None:
    base, tuned, _ = models
    sender, receiver = _store(tmp_path / "sender"), _store(tmp_path / "receiver")
    for repo in (sender, receiver):
        pack(repo, [base])
    old = sender.resolve("main").hex()
    on_the_fly = diff(sender, old, str(tuned), tmp_path / "tuned.bsp")  # NEW packed as deltas
    assert read_bundle(tmp_path / "tuned.bsp").chunks
    with open(tmp_path / "tuned.bsp", "rb") as handle:
        assert int.from_bytes(handle.read(10)[8:], "little") == DELTA_VERSION
    no_delta_store = _store(tmp_path / "nd")
    pack(no_delta_store, [base])
    whole_chunks = pack(no_delta_store, [tuned], ref="tuned", base=None)
    assert whole_chunks.delta_chunks == 0
    # Stored whole, the fine-tune still ships as deltas against OLD's chunks.
    made = diff(no_delta_store, "main", "tuned", tmp_path / "made.bsp")
    with open(tmp_path / "made.bsp", "rb") as handle:
        assert int.from_bytes(handle.read(10)[8:], "little") == DELTA_VERSION
    assert made.bundle_bytes < 0.4 * whole_chunks.new_bytes
    assert on_the_fly.bundle_bytes < 0.4 * whole_chunks.new_bytes
    unrelated = _store(tmp_path / "unrelated")
    write_safetensors(tmp_path / "r1.safetensors", {"w": random_tensor("BF16", (256, 256), seed=1)})
    write_safetensors(tmp_path / "r2.safetensors", {"w": random_tensor("BF16", (256, 256), seed=2)})
    pack(unrelated, [tmp_path / "r1.safetensors"])
    pack(unrelated, [tmp_path / "r2.safetensors"], ref="other")
    diff(unrelated, "main", "other", tmp_path / "whole.bsp")
    with open(tmp_path / "whole.bsp", "rb") as handle:  # nothing to gain: whole chunks, version 3
        assert int.from_bytes(handle.read(10)[8:], "little") == FORMAT_VERSION
    other = _store(tmp_path / "other-receiver")
    pack(other, [base])
    apply(other, tmp_path / "made.bsp")
    export(other, other.resolve("main"), tmp_path / "made.safetensors")
    assert sha256(tmp_path / "made.safetensors") == sha256(tuned)
    apply(receiver, tmp_path / "tuned.bsp")
    export(receiver, receiver.resolve("main"), tmp_path / "out.safetensors")
    assert sha256(tmp_path / "out.safetensors") == sha256(tuned)
    assert verify(receiver, deep=True).damages == []


def test_a_bundle_whose_delta_base_the_receiver_lacks_is_refused(models, tmp_path: Path) -> None:
    base, tuned, _ = models
    sender, receiver = _store(tmp_path / "sender"), _store(tmp_path / "receiver")
    for repo in (sender, receiver):
        pack(repo, [base])
    pack(sender, [tuned], ref="tuned")
    diff(sender, "main", "tuned", tmp_path / "p.bsp")
    shipped_base = next(
        iter(sender.delta_bases(sender.snapshot(sender.resolve("tuned")).chunk_keys()).values())
    )
    receiver.store.delete_batch([shipped_base])  # the receiver lost a chunk the deltas need
    before = receiver.resolve("main")
    result = cli("apply", tmp_path / "receiver", tmp_path / "p.bsp")
    assert result.exit_code != 0 and f"as a delta against chunk {shipped_base.hex()}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert receiver.resolve("main") == before
    with pytest.raises(BundleRejected):
        apply(receiver, tmp_path / "p.bsp")


def test_a_copy_takes_the_bases_along(models, tmp_path: Path) -> None:
    base, tuned, _ = models
    source = _store(tmp_path / "source")
    pack(source, [base])
    top = pack(source, [tuned]).snapshot_id
    destination = _store(tmp_path / "destination")
    transfer(source, destination)
    assert verify(destination, deep=True).damages == []
    assert _format(destination) == b"blockstore-lmdb/3"
    export(destination, top, tmp_path / "out.safetensors")
    assert sha256(tmp_path / "out.safetensors") == sha256(tuned)


def test_deltas_on_an_object_store(models, moto_url: str, tmp_path: Path) -> None:
    base, tuned, _ = models
    with Repository.init(moto_url, chunk_size=CHUNK) as repo:
        pack(repo, [base])
        top = pack(repo, [tuned])
        assert top.delta_chunks > 0 and repo.store.deltas_allowed
        gc(repo, keep=1)
        assert verify(repo, deep=True).damages == []
    loaded = runtime.open(moto_url, cache=tmp_path / "cache").load_all()
    expected = load_file(tuned)
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_the_cli_says_what_is_stored_as_deltas(models, tmp_path: Path) -> None:
    base, tuned, _ = models
    store = tmp_path / "store"
    _store(store).close()
    assert cli("pack", base, "--store", store).exit_code == 0
    packed = cli("pack", tuned, "--store", store)
    assert "stored as deltas against" in packed.stdout
    shown = cli("show", store, "--json").json()
    assert shown["deltas"]["delta_chunks"] > 0
    assert all(row["delta_chunks"] == row["chunks"] for row in shown["tensors"] if "mlp" in row["name"])
    assert "stored as deltas" in cli("show", store).stdout
    assert cli("stats", store, "--json").json()["delta_chunks"] == shown["deltas"]["delta_chunks"]
    none = cli("pack", tuned, "--store", store, "--ref", "again", "--base", "none", "--json").json()
    assert none["delta_chunks"] == 0
    missing = cli("pack", tuned, "--store", store, "--base", "nosuch")
    assert missing.exit_code != 0 and "nosuch" in missing.stderr


def test_a_snapshot_with_deltas_parses_as_any_other(models, tmp_path: Path) -> None:
    """The snapshot format does not change: deltas live in the stored values only."""
    base, tuned, _ = models
    repo = _store(tmp_path / "store")
    pack(repo, [base])
    top = pack(repo, [tuned]).snapshot_id
    assert Snapshot.from_bytes(repo.snapshot_bytes(top)).version == 3


def test_only_some_tensors_changed_ships_only_their_deltas(tmp_path: Path) -> None:
    base = _model()
    tuned = fine_tune(base, 1, names={"layers.1.mlp.weight"})
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    repo = _store(tmp_path / "store")
    pack(repo, [tmp_path / "base.safetensors"])
    result = pack(repo, [tmp_path / "tuned.safetensors"])
    per_tensor = delta_summary(repo, repo.snapshot(result.snapshot_id)).per_tensor
    assert set(per_tensor) == {"layers.1.mlp.weight"}


def test_random_bytes_are_not_stored_as_deltas(tmp_path: Path) -> None:
    """Where the delta is no smaller, the chunk is stored whole."""
    write_safetensors(tmp_path / "a.safetensors", {"w": random_tensor("BF16", (256, 256), seed=1)})
    write_safetensors(tmp_path / "b.safetensors", {"w": random_tensor("BF16", (256, 256), seed=2)})
    repo = _store(tmp_path / "store")
    pack(repo, [tmp_path / "a.safetensors"])
    assert pack(repo, [tmp_path / "b.safetensors"]).delta_chunks == 0


def test_decoded_bases_are_kept_when_asked(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blockstore.core.base_cache import BASES, BaseCache

    kept = BaseCache(64 << 20)
    monkeypatch.setattr("blockstore.repo.BASES", kept)
    base, tuned, _ = models
    repo = _store(tmp_path / "store")
    pack(repo, [base])
    top = pack(repo, [tuned]).snapshot_id
    export(repo, top, tmp_path / "first.safetensors")
    bases = set(repo.delta_bases(repo.snapshot(top).chunk_keys()).values())
    repo.store.delete_batch(bases)  # only the kept copies can serve them now
    export(repo, top, tmp_path / "second.safetensors")
    assert sha256(tmp_path / "second.safetensors") == sha256(tuned)
    assert BASES.limit == 0  # the process default: nothing kept
    kept.resize(0)
    with pytest.raises(TensorCorrupt, match="missing"):
        export(repo, top, tmp_path / "third.safetensors")


def test_the_serving_stream_reads_deltas_bit_exact(models, tmp_path: Path) -> None:
    """What vLLM's `--load-format blockstore` iterates (runtime.stream): a delta snapshot arrives
    bit-exact, and a lost base stops it with the tensor named."""
    from blockstore.runtime.stream import snapshot_order, stream_tensors

    base, tuned, _ = models
    repo = _store(tmp_path / "store")
    pack(repo, [base])
    top = repo.snapshot(pack(repo, [tuned]).snapshot_id)
    expected = load_file(tuned)
    streamed = stream_tensors(repo, top.id, snapshot_order(top), memory_limit=1 << 20, concurrency=2)
    assert {name: tensor.clone() for name, tensor in streamed}.keys() == expected.keys()
    for name, tensor in stream_tensors(
        repo, top.id, snapshot_order(top), memory_limit=1 << 20, concurrency=2
    ):
        assert torch.equal(tensor, expected[name]), name
    repo.store.delete_batch(set(repo.delta_bases(top.chunk_keys()).values()))
    with pytest.raises(TensorCorrupt, match="layers"):
        list(stream_tensors(repo, top.id, snapshot_order(top), memory_limit=1 << 20, concurrency=2))


def test_a_copy_never_makes_a_chain_two_deep(models, tmp_path: Path) -> None:
    """The destination stored the base model itself as deltas (against an older model); a copied
    fine-tune whose deltas name those chunks is re-encoded against their own bases."""
    base, tuned, tuned2 = models
    source = _store(tmp_path / "source")
    pack(source, [tuned])  # whole here
    top = pack(source, [tuned2]).snapshot_id  # deltas against tuned's chunks
    destination = _store(tmp_path / "destination")
    pack(destination, [base])
    pack(destination, [tuned])  # tuned's chunks are deltas against base's in the destination
    transfer(source, destination)
    keys = destination.snapshot(top).chunk_keys()
    bases = destination.delta_bases(keys)
    assert bases and not destination.delta_bases(set(bases.values()))  # every base decodes on its own
    assert verify(destination, deep=True).damages == []
    export(destination, top, tmp_path / "out.safetensors")
    assert sha256(tmp_path / "out.safetensors") == sha256(tuned2)


def test_rollback_from_a_fine_tune_reads_the_base_back(models, tmp_path: Path) -> None:
    from blockstore.patches.rollback import rollback

    base, tuned, _ = models
    store = tmp_path / "store"
    repo = _store(store)
    pack(repo, [base])
    pack(repo, [tuned])
    rollback(repo)
    export(repo, repo.resolve("main"), tmp_path / "back.safetensors")
    assert sha256(tmp_path / "back.safetensors") == sha256(base)
    assert cli("verify", store, "--deep").exit_code == 0


def test_a_bundle_without_deltas_is_one_an_older_blockstore_applies(models, tmp_path: Path) -> None:
    """`diff --no-deltas`: chunks stored as deltas ship whole, so the bundle is version 3."""
    base, tuned, _ = models
    sender = _store(tmp_path / "sender")
    pack(sender, [base])
    packed = pack(sender, [tuned], ref="tuned")
    assert packed.delta_chunks > 0
    whole = diff(sender, "main", "tuned", tmp_path / "whole.bsp", deltas=False)
    with open(tmp_path / "whole.bsp", "rb") as handle:
        assert int.from_bytes(handle.read(10)[8:], "little") == FORMAT_VERSION
    assert whole.bundle_bytes > 2 * packed.new_bytes  # whole chunks cost what deltas saved
    receiver = _store(tmp_path / "receiver")
    pack(receiver, [base])
    apply(receiver, tmp_path / "whole.bsp")
    assert _format(receiver) == b"blockstore-lmdb/2"  # nothing it holds needs a newer reader
    export(receiver, receiver.resolve("main"), tmp_path / "out.safetensors")
    assert sha256(tmp_path / "out.safetensors") == sha256(tuned)
    flag = cli(
        "diff", tmp_path / "sender", "main", "tuned", "-o", tmp_path / "cli.bsp", "--no-deltas", "--json"
    )
    assert flag.exit_code == 0 and flag.json()["bundle_bytes"] == whole.bundle_bytes, flag.stdout


@pytest.mark.parametrize("where", ["lmdb", "s3"])
def test_a_handle_opened_before_the_first_delta_sees_it(
    where: str, moto_url: str, tmp_path: Path, models
) -> None:
    """gc in a long-running process must see deltas another process (or handle) wrote since it
    opened the store, or it would not keep their bases."""
    location = str(tmp_path / "store") if where == "lmdb" else moto_url
    Repository.init(location, chunk_size=CHUNK).close()
    with Repository.open(location) as early:
        assert early.store.deltas_allowed is False
        base, tuned, _ = models
        with Repository.open(location) as writer:
            pack(writer, [base])
            pack(writer, [tuned])
        assert early.store.deltas_allowed is True
        gc(early, keep=1)
        assert verify(early, deep=True).damages == []


def test_finding_deltas_on_an_object_store_reads_envelopes_only(
    models, moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc, verify and show learn which chunks are deltas from the start of each value (a range
    request), never by fetching whole values."""
    base, tuned, _ = models
    with Repository.init(moto_url, chunk_size=CHUNK) as repo:
        pack(repo, [base])
        top = repo.snapshot(pack(repo, [tuned]).snapshot_id)

        def no_whole_values(*args: object) -> None:
            raise AssertionError("a whole value was fetched")

        monkeypatch.setattr(repo.store, "with_value", no_whole_values)
        monkeypatch.setattr(repo.store, "get", no_whole_values)
        bases = repo.delta_bases(top.chunk_keys())
        assert len(bases) == sum(1 for e in top.tensors.values() if "mlp" in e.name for _ in e.chunks)
        assert gc(repo, keep=1, dry_run=True).deleted_chunks == 0


def test_a_base_cache_size_that_is_not_a_size_is_one_line(
    models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockstore.core.base_cache import BASE_CACHE_ENV, BaseCache

    base, tuned, _ = models
    store = tmp_path / "store"
    repo = _store(store)
    pack(repo, [base])
    pack(repo, [tuned])
    repo.close()
    monkeypatch.setattr("blockstore.repo.BASES", BaseCache(None))  # as a fresh process has it
    monkeypatch.setenv(BASE_CACHE_ENV, "lots")
    result = cli("export", store, tmp_path / "out.safetensors")
    assert_one_line_error(result, BASE_CACHE_ENV, "lots")
    assert not (tmp_path / "out.safetensors").exists()

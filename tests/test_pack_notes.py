"""`pack` says when an option cannot take effect (`PackResult.notes`), and `to_json` is what
`pack --json` prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blockstore.codecs import framing
from blockstore.ops.pack import pack
from blockstore.repo import Repository

from .helpers import RawTensor, cli, random_tensor, write_safetensors

CHUNK = 64 << 10


def compressible(shape: tuple[int, ...], seed: int) -> RawTensor:
    """float32 small integers: every codec but raw shrinks them."""
    values = np.random.default_rng(seed).integers(0, 4, shape).astype(np.float32)
    return RawTensor("F32", shape, values.tobytes())


@pytest.fixture
def store(tmp_path: Path) -> Path:
    Repository.init(tmp_path / "store", chunk_size=CHUNK).close()
    return tmp_path / "store"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    # 512 KiB: 8 chunks of the store's size
    return write_safetensors(tmp_path / "model.safetensors", {"mlp.weight": compressible((512, 256), 1)})


def stored_codec_ids(repo: Repository) -> set[str]:
    snapshot = repo.snapshot(repo.resolve("main"))
    ids = set()
    for entry in snapshot.tensors.values():
        for chunk in entry.chunks:
            (codec_id, _), _ = framing.unframe(repo.store.get(chunk.key))
            ids.add(codec_id)
    return ids


def test_a_codec_asked_for_after_another_reaches_new_chunks_only(
    store: Path, model: Path, tmp_path: Path
) -> None:
    with Repository.open(store) as repo:
        first = pack(repo, [model], codec="zstd")
        assert first.notes == [] and first.new_chunks == 8
        again = pack(repo, [model], codec="raw")
        assert again.new_chunks == 0
        assert again.notes == [
            "--codec raw applies to new chunks only: 8 chunks were already in the store and were "
            "reused as stored, 8 under zstd"
        ]
        assert stored_codec_ids(repo) == {"zstd"}  # what the note says: they kept their codec
        grown = write_safetensors(
            tmp_path / "grown.safetensors",
            {"mlp.weight": compressible((512, 256), 1), "ffn.weight": compressible((256, 256), 2)},
        )
        mixed = pack(repo, [grown], codec="bytegroup+zstd")
        assert mixed.new_chunks == 4
        assert mixed.notes == [
            "--codec bytegroup+zstd applies to new chunks only: 8 chunks were already in the store and "
            "were reused as stored, 8 under zstd"
        ]
        assert stored_codec_ids(repo) == {"zstd", "bytegroup+zstd"}


def test_no_note_when_the_reused_chunks_have_the_codec_asked_for(store: Path, model: Path) -> None:
    with Repository.open(store) as repo:
        pack(repo, [model], codec="zstd")
        same = pack(repo, [model], codec="zstd")
    assert same.unchanged and same.new_chunks == 0 and same.notes == []


def test_chunks_kept_raw_are_not_counted_against_any_codec(store: Path, tmp_path: Path) -> None:
    """A lossless codec keeps a chunk raw when encoding does not pay: a later pack with another
    codec would (most likely) have kept it raw too, and one asking for raw got just that."""
    noise = write_safetensors(
        tmp_path / "noise.safetensors", {"mlp.weight": random_tensor("U8", (1024, 256))}
    )
    with Repository.open(store) as repo:
        pack(repo, [noise])
        assert stored_codec_ids(repo) == {"raw"}
        for codec in ("bytegroup+zstd", "zstd", "raw"):
            assert pack(repo, [noise], codec=codec).notes == [], codec


def test_reused_chunks_are_found_in_snapshots_no_ref_points_at(store: Path, model: Path) -> None:
    with Repository.open(store) as repo:
        pack(repo, [model], ref=None, codec="zstd")  # stored, no ref (as `diff` packs a file)
        result = pack(repo, [model], codec="raw")
    assert result.notes and result.notes[0].endswith("8 under zstd")


def test_a_chunk_size_unlike_the_stores_says_it_will_not_dedup(store: Path, model: Path) -> None:
    with Repository.open(store) as repo:
        pack(repo, [model])
        other = pack(repo, [model], chunk_size=CHUNK // 2)
        assert other.new_chunks == 16  # nothing deduplicated, as the note says
        assert other.notes == [
            f"--chunk-size {CHUNK // 2} differs from the store's chunk size {CHUNK} (set at init): "
            f"tensors cut into {CHUNK // 2}-byte chunks never dedup against chunks cut at {CHUNK} "
            "bytes, already stored or packed later with the store's size"
        ]
        assert pack(repo, [model], chunk_size=CHUNK).notes == []


def test_to_json_is_what_pack_json_prints_plus_notes(store: Path, model: Path) -> None:
    printed = cli("pack", model, "--store", store, "--json", "--explain")
    assert printed.exit_code == 0, printed.stderr
    with Repository.open(store) as repo:
        result = pack(repo, [model], chunk_size=CHUNK // 2)
    summary = result.to_json(explain=True)
    assert set(summary) == set(printed.json()) | {"notes"}
    assert set(result.to_json()) == set(summary) - {"explain"}
    assert summary["notes"] == result.notes and len(result.notes) == 1
    assert summary["groups"] == {"static/lossless": {**summary["groups"]["static/lossless"]}}
    for key in ("tensors", "raw_bytes", "explain"):
        assert summary[key] == printed.json()[key], key

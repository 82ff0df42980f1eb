"""The real model: all-MiniLM-L6-v2 (fp32 + one int64 buffer), shipped by a PyPI package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from blockstore.ops.export import export
from blockstore.ops.pack import pack
from blockstore.ops.verify import verify
from blockstore.repo import Repository

from .helpers import cli, sha256


def test_real_model_round_trip_and_dedup(tmp_path: Path, store_path: Path, minilm_path: Path) -> None:
    first = cli("pack", minilm_path, "--store", store_path, "--json")
    assert first.exit_code == 0, first.stderr
    summary = first.json()
    assert summary["tensors"] == 104 and summary["new_chunks"] == summary["chunks"] > 0
    assert 0 < summary["ratio"] < 0.9

    again = cli("pack", minilm_path, "--store", store_path, "--json").json()
    assert again["new_chunks"] == 0 and again["new_bytes"] == 0
    assert again["unchanged"] and again["snapshot"] == summary["snapshot"]

    out = tmp_path / "exported.safetensors"
    assert cli("export", f"{store_path}@main", out).exit_code == 0
    assert sha256(out) == sha256(minilm_path)
    assert cli("verify", "--deep", store_path).exit_code == 0


def test_fine_tune_stores_only_changed_chunks(tmp_path: Path, repo: Repository, minilm_path: Path) -> None:
    base = pack(repo, [minilm_path], chunk_size=1 << 20)
    weights = load_file(str(minilm_path))
    name = "embeddings.word_embeddings.weight"  # 30522 x 384 F32 = 45 MiB = 45 chunks of 1 MiB
    rows_per_chunk = (1 << 20) // (384 * 4)
    weights[name] = weights[name].copy()
    weights[name][5] += 1.0  # one row: exactly one chunk of this tensor changes
    tuned_path = tmp_path / "tuned" / "model.safetensors"
    tuned_path.parent.mkdir()
    save_file(weights, str(tuned_path), metadata={"format": "pt"})

    tuned = pack(repo, [tuned_path], message="fine-tune", chunk_size=1 << 20)
    assert tuned.new_chunks == 1, tuned
    assert tuned.new_bytes <= rows_per_chunk * 384 * 4
    assert not tuned.unchanged and tuned.snapshot_id != base.snapshot_id
    assert repo.snapshot(tuned.snapshot_id).parent == base.snapshot_id

    export(repo, tuned.snapshot_id, tmp_path / "tuned.out")
    assert sha256(tmp_path / "tuned.out") == sha256(tuned_path)
    export(repo, base.snapshot_id, tmp_path / "base.out")
    assert sha256(tmp_path / "base.out") == sha256(minilm_path)
    assert np.array_equal(load_file(str(tmp_path / "tuned.out"))[name], weights[name])
    assert verify(repo, deep=True).clean

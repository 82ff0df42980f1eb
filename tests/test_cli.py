"""The CLI surface: every verb has --help and --json; sharded models round-trip through a directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .helpers import cli, random_tensor, sha256, write_safetensors

VERBS = ["init", "pack", "export", "ls", "show", "stats", "verify"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb: str) -> None:
    result = cli(verb, "--help")
    assert result.exit_code == 0 and "--json" in result.stdout


def test_json_output_of_every_verb(tmp_path: Path) -> None:
    store = tmp_path / "store"
    model = write_safetensors(tmp_path / "m.safetensors", {"mlp.weight": random_tensor("BF16", (128, 256))})
    assert cli("init", store, "--json").json() == {"store": str(store), "created": True}
    packed = cli("pack", model, "-s", store, "-m", "first", "--json").json()
    assert packed["tensors"] == 1 and packed["raw_bytes"] == 128 * 256 * 2
    listing = cli("ls", store, "--json").json()
    assert listing["refs"] == {"main": packed["snapshot"]}
    assert listing["snapshots"][0]["message"] == "first"
    shown = cli("show", f"{store}@{packed['snapshot'][:10]}", "mlp.weight", "--json").json()
    [row] = shown["tensors"]
    assert (row["dtype"], row["shape"], row["side"], row["codec"]) == (
        "BF16",
        [128, 256],
        "static",
        "bytegroup+zstd",
    )
    assert cli("stats", store, "--json").json()["snapshots"] == 1
    assert cli("verify", store, "--json").json()["clean"] is True
    exported = cli("export", store, tmp_path / "out.safetensors", "--json").json()
    assert exported["bytes"] == model.stat().st_size


def test_human_output_is_not_json_and_has_no_progress_noise(tmp_path: Path) -> None:
    store = tmp_path / "store"
    model = write_safetensors(tmp_path / "m.safetensors", {"w": random_tensor("F32", (16, 16))})
    cli("init", store)
    result = cli("pack", model, "-s", store)
    assert result.exit_code == 0 and "ratio" in result.stdout and result.stderr == ""
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_sharded_model_directory_round_trips(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    write_safetensors(
        model / "model-00001-of-00002.safetensors", {"a": random_tensor("BF16", (64, 32), seed=1)}
    )
    write_safetensors(model / "model-00002-of-00002.safetensors", {"b": random_tensor("F16", (32,), seed=2)})
    index = {
        "metadata": {"total_size": 64 * 32 * 2 + 64},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "config.json").write_text('{"model_type": "llama"}')
    store = tmp_path / "store"
    cli("init", store)
    assert cli("pack", model, "-s", store).exit_code == 0
    out = tmp_path / "out"
    assert cli("export", store, out).exit_code == 0
    for name in [p.name for p in model.iterdir()]:
        assert sha256(out / name) == sha256(model / name), name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in model.iterdir())


def test_store_keeps_its_chunk_size(tmp_path: Path) -> None:
    store = tmp_path / "store"
    model = write_safetensors(tmp_path / "m.safetensors", {"w": random_tensor("F32", (64, 64))})
    assert cli("init", store, "--chunk-size", "4096").exit_code == 0
    assert cli("pack", model, "-s", store, "--json").json()["chunks"] == 4  # 16 KiB / 4 KiB
    assert cli("pack", model, "-s", store, "--chunk-size", "8192", "--json").json()["chunks"] == 2

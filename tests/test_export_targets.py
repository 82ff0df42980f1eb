"""Where export writes: a file, or a directory (existing, or asked for with a trailing slash), and
what a file target leaves out is said, not silently dropped."""

from __future__ import annotations

import json
from pathlib import Path

import blockstore

from .helpers import cli, random_tensor, write_safetensors

CONFIG = {"model_type": "bert", "hidden_size": 8}


def packed_with_config(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "model"
    model.mkdir()
    weights = write_safetensors(model / "model.safetensors", {"w": random_tensor("F32", (16, 16), 1)})
    (model / "config.json").write_text(json.dumps(CONFIG))
    store = tmp_path / "store"
    with blockstore.init(store) as repo:
        blockstore.pack(repo, [model])
    return store, weights


def test_a_trailing_slash_asks_for_a_directory_with_the_side_files(tmp_path: Path) -> None:
    store, weights = packed_with_config(tmp_path)
    result = blockstore.export(store, "main", f"{tmp_path / 'api-out'}/")
    assert (tmp_path / "api-out" / "model.safetensors").read_bytes() == weights.read_bytes()
    assert json.loads((tmp_path / "api-out" / "config.json").read_text()) == CONFIG
    assert result.notes == []
    assert cli("export", store, f"{tmp_path / 'cli-out'}/").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "cli-out").iterdir()) == ["config.json", "model.safetensors"]


def test_a_file_target_says_it_leaves_the_side_files_out(tmp_path: Path) -> None:
    store, weights = packed_with_config(tmp_path)
    out = tmp_path / "restored.safetensors"
    result = blockstore.export(store, "main", out)
    assert out.read_bytes() == weights.read_bytes()
    assert len(result.notes) == 1 and "config.json" in result.notes[0] and "directory" in result.notes[0]
    shown = cli("export", store, tmp_path / "again.safetensors")
    assert shown.exit_code == 0 and "blockstore: note:" in shown.stderr and "config.json" in shown.stderr

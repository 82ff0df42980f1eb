"""Result objects: `to_json()` gives what the CLI prints with --json, and notes tell what a flag or an
argument did that the user may not expect."""

from __future__ import annotations

from pathlib import Path

from blockstore import patches
from blockstore.ops.doctor import doctor
from blockstore.ops.export import export
from blockstore.ops.gc import gc
from blockstore.ops.pack import pack
from blockstore.ops.transfer import transfer
from blockstore.ops.verify import verify
from blockstore.repo import Repository

from .helpers import cli, random_tensor, write_safetensors

VOLATILE = {"seconds", "age_s"}


def _without_timings(payload: object) -> object:
    """`payload` with the keys whose values are timings (they differ between two runs) dropped."""
    if isinstance(payload, dict):
        return {key: _without_timings(value) for key, value in payload.items() if key not in VOLATILE}
    if isinstance(payload, list):
        return [_without_timings(item) for item in payload]
    return payload


def _without_notes(payload: dict) -> dict:
    return {key: value for key, value in payload.items() if key != "notes"}


def test_to_json_matches_the_cli(tmp_path: Path) -> None:
    v1 = write_safetensors(tmp_path / "v1.safetensors", {"a": random_tensor("F32", (64, 64), 1)})
    v2 = write_safetensors(tmp_path / "v2.safetensors", {"a": random_tensor("F32", (64, 64), 2)})
    store, other = tmp_path / "store", tmp_path / "other-api"
    with Repository.init(store, chunk_size=4096) as repo:
        pack(repo, [v1])
    cli("tag", store, "v1")
    assert cli("pack", v2, "-s", store).exit_code == 0

    def same(api: dict, *args: object) -> None:
        shown = cli(*args, "--json")
        assert shown.exit_code in (0, 4), shown.stderr
        assert _without_timings(_without_notes(api)) == _without_timings(_without_notes(shown.json())), args

    with Repository.open(store) as repo:
        same(
            export(repo, repo.resolve("main"), tmp_path / "out.safetensors").to_json(),
            "export",
            store,
            tmp_path / "out.safetensors",
        )
        same(verify(repo, deep=True).to_json(), "verify", "--deep", store)
        same(gc(repo, dry_run=True).to_json(), "gc", "--dry-run", store)
        same(doctor(repo).to_json(), "doctor", store)
        diffed = patches.diff(repo, "v1", "main", tmp_path / "api.bsp")
        same(diffed.to_json(), "diff", store, "v1", "main", "-o", tmp_path / "cli.bsp")
        same({"ref": "main", "entries": [e.to_json() for e in patches.log(repo, "main")]}, "log", store)
    # Copy v1 to two new stores, then update and roll back each: one through the API, one the CLI.
    with Repository.open(store) as source, Repository.init(other, chunk_size=4096) as destination:
        same(
            transfer(source, destination, "v1").to_json(),
            "push",
            store,
            tmp_path / "other-cli",
            "--ref",
            "v1",
        )
    with Repository.open(other) as repo:
        applied = patches.apply(repo, tmp_path / "api.bsp", ref="v1").to_json()
        same(applied, "apply", tmp_path / "other-cli", tmp_path / "cli.bsp", "--ref", "v1")
        same(patches.rollback(repo, ref="v1").to_json(), "rollback", tmp_path / "other-cli", "--ref", "v1")


def test_a_multi_file_snapshot_exported_to_a_file_name_says_it_writes_a_directory(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    write_safetensors(model / "model-00001-of-00002.safetensors", {"a": random_tensor("F32", (8, 8), 1)})
    write_safetensors(model / "model-00002-of-00002.safetensors", {"b": random_tensor("F32", (8,), 2)})
    with Repository.init(tmp_path / "store") as repo:
        snapshot_id = pack(repo, [model]).snapshot_id
        single = export(repo, snapshot_id, tmp_path / "into-a-directory")
        assert single.notes == []
        result = export(repo, snapshot_id, tmp_path / "X.safetensors")
    assert (tmp_path / "X.safetensors").is_dir()
    [note] = result.notes
    assert "holds 2 files" in note and "X.safetensors is written as a directory" in note
    assert result.to_json()["notes"] == [note]

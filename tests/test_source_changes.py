"""A model file that changes while `pack` reads it is refused, and nothing is published (issue:
overwritten in place, appended to, or replaced by another file mid-pack)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from blockstore.core.source import ModelSource
from blockstore.errors import SourceChanged
from blockstore.ops import pack as pack_module
from blockstore.ops.export import export
from blockstore.ops.pack import pack
from blockstore.repo import Repository

from .helpers import assert_one_line_error, cli, random_tensor, write_safetensors

CHUNK = 64 << 10


class ChangeMidway:
    """A progress listener that runs `change` once, after the first chunk is read: the file is then
    half read, as when a copy or a download is still writing it."""

    def __init__(self, change: Callable[[], None]) -> None:
        self.change, self.done = change, False

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int, item: str = "") -> None:
        if not self.done:
            self.done = True
            self.change()


def overwrite_in_place(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) - 16)
        handle.write(b"\xff" * 16)


def append(path: Path) -> None:
    with open(path, "ab") as handle:
        handle.write(b"\0" * 4096)


def replace_by_rename(path: Path) -> None:
    other = path.with_name("other.safetensors")
    other.write_bytes(path.read_bytes())
    os.replace(other, path)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_safetensors(
        tmp_path / "model.safetensors",
        {"a.weight": random_tensor("F32", (256, 256), 1), "b.weight": random_tensor("F32", (256, 256), 2)},
    )


@pytest.mark.parametrize("change", [overwrite_in_place, append])
def test_a_file_that_changes_mid_pack_is_refused_and_nothing_is_published(
    tmp_path: Path, model: Path, change: Callable[[Path], None]
) -> None:
    with Repository.init(tmp_path / "store", chunk_size=CHUNK) as repo:
        with pytest.raises(SourceChanged, match="changed while it was packed") as refused:
            pack(repo, [model], progress=ChangeMidway(lambda: change(model)))
        assert str(model) in str(refused.value)
        assert repo.refs() == {} and repo.snapshots() == []


def test_a_file_replaced_mid_pack_packs_the_version_it_was_reading(tmp_path: Path, model: Path) -> None:
    """The open handle keeps reading the validated file, so the snapshot is that file exactly."""
    original = model.read_bytes()
    with Repository.init(tmp_path / "store", chunk_size=CHUNK) as repo:
        pack(repo, [model], progress=ChangeMidway(lambda: (replace_by_rename(model), append(model))))
        export(repo, repo.resolve("main"), tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == original


def test_an_unchanged_file_packs(tmp_path: Path, model: Path) -> None:
    with Repository.init(tmp_path / "store", chunk_size=CHUNK) as repo:
        result = pack(repo, [model], progress=ChangeMidway(lambda: None))
        assert repo.refs() == {"main": result.snapshot_id}


@pytest.mark.parametrize("change", [append, replace_by_rename])
def test_a_file_changed_after_validation_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: Path, change: Callable[[Path], None]
) -> None:
    """Between validation and reading: the file the CLI validated is not the one it would read."""
    store = tmp_path / "store"
    assert cli("init", store).exit_code == 0
    real_discover = pack_module.discover

    def discover_then_change(inputs: list[Path]) -> ModelSource:
        found = real_discover(inputs)
        change(model)
        return found

    monkeypatch.setattr(pack_module, "discover", discover_then_change)
    assert_one_line_error(cli("pack", model, "--store", store), str(model), "changed while it was packed")
    with Repository.open(store) as repo:
        assert repo.refs() == {}

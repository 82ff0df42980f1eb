"""A damaged, half-created or unlocked LMDB store is named in one line, never a SIGBUS, an LMDB
traceback, a path no command can open, or a write through a lock file someone replaced."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from blockstore.errors import BlockstoreError, EnvironmentFailure, StoreCorrupt, StoreNotFound
from blockstore.ops.pack import pack
from blockstore.repo import Repository
from blockstore.runtime import open as open_lazy

from .faults import RUN_CLI
from .helpers import assert_one_line_error, cli, random_tensor, write_safetensors

# Page header (16 bytes) and the two MDB_db records of LMDB's meta page (see storage/lmdb.py).
PAGE_HEADER = 16
MAIN_DB_ROOT = PAGE_HEADER + 24 + 48 + 40  # mm_dbs[MAIN_DBI].md_root
MAIN_DB_TXNID = PAGE_HEADER + 24 + 96 + 8


def _model(directory: Path, seed: int = 0) -> Path:
    tensors = {f"layer{i}.weight": random_tensor("F32", (128, 64), seed=seed * 100 + i) for i in range(6)}
    return write_safetensors(directory / f"model{seed}.safetensors", tensors)


@pytest.fixture
def packed(tmp_path: Path, store_path: Path) -> tuple[Path, Path]:
    """A store holding one snapshot of a six-tensor model cut into 4 KiB chunks; (store, model)."""
    model = _model(tmp_path)
    with Repository.open(store_path) as repo:
        pack(repo, [model], chunk_size=4096)
    return store_path, model


def run_cli(*args: object) -> subprocess.CompletedProcess:
    """The CLI in its own process: a SIGBUS there fails the test instead of killing pytest."""
    command = [sys.executable, "-c", RUN_CLI, *(str(a) for a in args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


LOAD_LAZILY = """
import sys
from blockstore.errors import BlockstoreError
from blockstore.runtime import open
try:
    weights = open(sys.argv[1])
    for name in weights.keys():
        weights[name].materialize()
except BlockstoreError as exc:
    print(type(exc).__name__, exc)
    sys.exit(4)
"""


def assert_damage_named(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 4, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockstore: error: store "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# item 5: a truncated data.mdb -------------------------------------------------------------------


@pytest.mark.parametrize("length", ["half", 12288, 8192])
def test_truncated_data_file_is_named_not_a_sigbus(packed, tmp_path: Path, length) -> None:
    store, _ = packed
    data_file = store / "data.mdb"
    size = data_file.stat().st_size
    os.truncate(data_file, size // 2 if length == "half" else length)
    commands = [["verify", store], ["export", store, tmp_path / "out.safetensors"]]
    if length == "half":
        commands += [["verify", "--deep", store], ["doctor", store]]
    for command in commands:
        assert_damage_named(run_cli(*command), str(store), "data.mdb is truncated")
    lazy = subprocess.run([sys.executable, "-c", LOAD_LAZILY, str(store)], capture_output=True, text=True)
    assert lazy.returncode == 4 and lazy.stdout.startswith("StoreCorrupt"), (lazy.returncode, lazy.stderr)
    assert not (tmp_path / "out.safetensors").exists()


def test_data_file_shorter_than_its_meta_pages_is_damage(packed) -> None:
    store, _ = packed
    os.truncate(store / "data.mdb", 100)
    assert_one_line_error(cli("verify", store), str(store), "too short", exit_code=4)


# item 6: damaged B-tree pages -------------------------------------------------------------------


def _sub_database_root(data: bytes, name: bytes) -> tuple[int, int]:
    """(page size, root page) of the named sub-database, read from the main database's leaf."""
    page_size = struct.unpack_from("=I", data, PAGE_HEADER + 24)[0]
    metas = [struct.unpack_from("=Q", data, page * page_size + MAIN_DB_TXNID)[0] for page in (0, 1)]
    meta = page_size * metas.index(max(metas))
    root = struct.unpack_from("=Q", data, meta + MAIN_DB_ROOT)[0]
    page = root * page_size
    lower = struct.unpack_from("=H", data, page + 12)[0]
    for slot in range((lower - PAGE_HEADER) // 2):
        node = page + struct.unpack_from("=H", data, page + PAGE_HEADER + 2 * slot)[0]
        key_size = struct.unpack_from("=H", data, node + 6)[0]
        if data[node + 8 : node + 8 + key_size] == name:
            return page_size, struct.unpack_from("=Q", data, node + 8 + key_size + 40)[0]
    raise AssertionError(f"no sub-database {name!r} in the main database")


def _damage_page(store: Path, name: bytes, how: str) -> None:
    data = bytearray((store / "data.mdb").read_bytes())
    page_size, root = _sub_database_root(bytes(data), name)
    start = root * page_size
    if how == "zeroed":
        data[start : start + page_size] = bytes(page_size)
    else:  # the page header's flags: a branch page read as a leaf, a leaf as a branch
        data[start + 10] ^= 0x03
    (store / "data.mdb").write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["zeroed", "flipped"])
def test_damaged_chunk_tree_is_named_by_every_reader(packed, tmp_path: Path, how: str) -> None:
    store, _ = packed
    _damage_page(store, b"chunks", how)
    for command in (["verify", store], ["verify", "--deep", store], ["export", store, tmp_path / "o"]):
        assert_one_line_error(cli(*command), str(store), "damaged", "chunk", exit_code=4)
    with pytest.raises(StoreCorrupt, match="chunk"):
        weights = open_lazy(store)
        try:
            for name in weights:
                weights[name].materialize()
        finally:
            weights.close()


def test_damaged_snapshot_tree_is_named(packed) -> None:
    store, _ = packed
    _damage_page(store, b"snapshots", "zeroed")
    assert_one_line_error(cli("verify", store), str(store), "snapshots", exit_code=4)
    assert_one_line_error(cli("ls", store), str(store), exit_code=4)


# item 7: a killed init --------------------------------------------------------------------------

DIE_IN_INIT = """
import os, sys, lmdb
real_open = lmdb.open

class Dying:
    def __init__(self, env):
        self.env = env
    def begin(self, *args, **kwargs):
        os._exit(97)  # killed after data.mdb exists, before its sub-databases are committed
    def __getattr__(self, name):
        return getattr(self.env, name)

def dying_open(path, *args, **kwargs):
    env = real_open(path, *args, **kwargs)
    return Dying(env) if kwargs.get("create") else env

lmdb.open = dying_open
from blockstore.cli.app import main
sys.argv[0] = "blockstore"
main()
"""


def _killed(*args: object) -> None:
    command = [sys.executable, "-c", DIE_IN_INIT, *(str(a) for a in args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 97, result.stderr


@pytest.mark.parametrize("existing", [False, True], ids=["new-path", "empty-directory"])
def test_killed_init_leaves_nothing_and_init_works_again(tmp_path: Path, existing: bool) -> None:
    store = tmp_path / "store"
    if existing:
        store.mkdir()
    _killed("init", store)
    assert_one_line_error(cli("verify", store), "no blockstore at", exit_code=3)
    result = cli("init", store)
    assert result.exit_code == 0, result.stderr
    assert cli("verify", store).exit_code == 0
    leftovers = [entry.name for entry in (*tmp_path.iterdir(), *store.iterdir()) if "creating" in entry.name]
    assert leftovers == [], "the dead init's build directory was not cleaned up"


def test_killed_pull_into_a_new_directory_can_be_repeated(packed, tmp_path: Path) -> None:
    source, _ = packed
    destination = tmp_path / "copy"
    _killed("pull", source, destination)
    with pytest.raises(StoreNotFound):
        Repository.open(destination)
    result = cli("pull", source, destination)
    assert result.exit_code == 0, result.stderr
    assert cli("verify", "--deep", destination).exit_code == 0


def test_init_refuses_a_store_and_a_file(packed, tmp_path: Path) -> None:
    store, _ = packed
    assert_one_line_error(cli("init", store), "already exists")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(cli("init", tmp_path / "file"), "already exists")


def test_live_build_directory_is_left_alone(tmp_path: Path) -> None:
    """Another init still building (a live pid) beside the path is not removed."""
    import socket

    live = tmp_path / f".store.creating-{socket.gethostname()}-{os.getppid()}-abc123"
    live.mkdir()
    Repository.init(tmp_path / "store").close()
    assert live.is_dir()


# item 8: lock.mdb replaced under a writer ------------------------------------------------------


def test_writer_refuses_after_lock_file_is_replaced(packed, tmp_path: Path) -> None:
    store, _ = packed
    second, third = _model(tmp_path, seed=1), _model(tmp_path, seed=2)
    with Repository.open(store) as repo:
        assert repo.refs()  # holding the environment, as a long pack does
        (store / "lock.mdb").unlink()
        other = run_cli("pack", second, "--store", store, "--ref", "other")
        assert other.returncode == 0, other.stderr  # a second writer, on a fresh lock.mdb
        with pytest.raises(EnvironmentFailure, match=r"lock\.mdb was removed or replaced"):
            pack(repo, [third], chunk_size=4096)
    assert cli("verify", "--deep", store).exit_code == 0
    with Repository.open(store) as repo:
        assert set(repo.refs()) == {"main", "other"}


def test_writer_refuses_after_lock_file_is_removed(packed) -> None:
    store, _ = packed
    with Repository.open(store) as repo:
        (store / "lock.mdb").unlink()
        with pytest.raises(EnvironmentFailure, match=str(store)) as caught:
            repo.tag("v1", "main")
        assert caught.value.exit_code == 8
    with Repository.open(store) as repo:  # a fresh open makes a fresh lock file and may write
        repo.tag("v1", "main")


def test_errors_are_blockstore_errors() -> None:
    assert issubclass(EnvironmentFailure, BlockstoreError)
    assert EnvironmentFailure.exit_code not in {2, 3, 4, 5, 6, 7}

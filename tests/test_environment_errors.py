"""The environment refusing (a full disk, a read-only mount, no permission) is exit 8 with the path
and the cause in one line: never a traceback, and never exit 4, which says the data is damaged.

Full disks are real where this process may mount a 2 MiB tmpfs (root); elsewhere a file-size
rlimit makes LMDB's writes fail the same way, and export's write is made to raise ENOSPC. A
read-only store is a read-only bind mount; running as root, chmod would not stop this process, so
a store whose lock file this process may not open is simulated by refusing LMDB's locked open."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lmdb
import numpy as np
import pytest

import blockstore.ops.export as export_module
from blockstore.errors import EnvironmentFailure, StoreCorrupt
from blockstore.ops.pack import pack
from blockstore.repo import Repository
from blockstore.runtime import open as open_lazy
from blockstore.storage import lmdb as lmdb_store

from .faults import RUN_CLI
from .helpers import RawTensor, assert_one_line_error, cli, random_tensor, write_safetensors

ENVIRONMENT = EnvironmentFailure.exit_code
ONES = RawTensor("F32", (64, 64), np.ones((64, 64), np.float32).tobytes())


def _incompressible_model(directory: Path, megabytes: int = 4) -> Path:
    return write_safetensors(
        directory / "big.safetensors", {"w": random_tensor("F32", (megabytes << 8, 1024))}
    )


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, or a skip where this process may not mount one."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)):
        pytest.skip("cannot mount a tmpfs here (not root); the rlimit and patched-write tests cover this")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.fixture
def read_only_view(tmp_path: Path, store_path: Path) -> Iterator[Path]:
    """The store, packed, seen through a read-only bind mount (or a skip where mounts are denied)."""
    model = write_safetensors(tmp_path / "m.safetensors", {"w": ONES})
    assert cli("pack", model, "--store", store_path).exit_code == 0
    view = tmp_path / "read-only"
    view.mkdir()
    if not _mount("--bind", str(store_path), str(view)):
        pytest.skip("cannot bind-mount here (not root)")
    try:
        if not _mount("-o", "remount,bind,ro", str(view)):
            pytest.skip("cannot remount read-only here")
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=True)


# a full disk ----------------------------------------------------------------------------------------


def test_pack_onto_a_full_disk_names_the_store_and_the_cause(small_filesystem: Path, tmp_path: Path) -> None:
    store = small_filesystem / "store"
    assert cli("init", store).exit_code == 0
    result = cli("pack", _incompressible_model(tmp_path), "--store", store)
    assert_one_line_error(result, str(store), "no space left on device", exit_code=ENVIRONMENT)
    assert cli("verify", store).exit_code == 0  # the store is fine, and holds nothing new
    assert cli("ls", store, "--json").json().get("refs", {}) == {}


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_pack_whose_writes_the_system_refuses_exits_with_the_environment_code(
    store_path: Path, tmp_path: Path
) -> None:
    """A file-size limit makes LMDB's page writes fail (EFBIG, or a short write it calls EIO)."""
    model = _incompressible_model(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "pack", str(model), "--store", str(store_path)],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == ENVIRONMENT, result.stderr[-2000:]
    assert len(lines) == 1 and str(store_path) in lines[0], result.stderr
    assert cli("verify", store_path).exit_code == 0


def test_an_io_error_on_a_nearly_full_disk_is_called_a_full_disk(monkeypatch, store_path: Path) -> None:
    class Full:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(lmdb_store.os, "statvfs", lambda path: Full())
    failure = lmdb_store._lmdb_failure(
        store_path, lmdb.Error("mdb_txn_commit: Input/output error"), "writing chunks", writing=True
    )
    assert isinstance(failure, EnvironmentFailure)
    assert "no space left on device" in str(failure) and str(store_path) in str(failure)
    damage = lmdb_store._lmdb_failure(
        store_path, lmdb.CorruptedError("mdb_get: MDB_CORRUPTED"), "reading chunks", writing=False
    )
    assert isinstance(damage, StoreCorrupt)


def test_export_to_a_full_disk_names_the_file(
    small_filesystem: Path, tmp_path: Path, store_path: Path
) -> None:
    assert cli("pack", _incompressible_model(tmp_path), "--store", store_path).exit_code == 0
    out = small_filesystem / "big.safetensors"
    assert_one_line_error(
        cli("export", store_path, out), str(out), "no space left on device", exit_code=ENVIRONMENT
    )
    assert list(small_filesystem.iterdir()) == []  # no partial file left behind


def test_export_whose_write_fails_with_enospc_names_the_file(
    monkeypatch, tmp_path: Path, store_path: Path
) -> None:
    model = write_safetensors(tmp_path / "m.safetensors", {"w": ONES})
    assert cli("pack", model, "--store", store_path).exit_code == 0
    real_open = open

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def fileno(self):
            return self.handle.fileno()

        def write(self, block):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(export_module, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    out = tmp_path / "out.safetensors"
    assert_one_line_error(
        cli("export", store_path, out), str(out), "no space left on device", exit_code=ENVIRONMENT
    )
    assert [entry.name for entry in tmp_path.iterdir() if "partial" in entry.name] == []


# read-only stores -------------------------------------------------------------------------------------


def test_readers_work_on_a_read_only_mount_and_writers_get_the_environment_code(
    read_only_view: Path, tmp_path: Path
) -> None:
    assert cli("verify", "--deep", read_only_view).exit_code == 0
    assert cli("export", read_only_view, tmp_path / "out.safetensors").exit_code == 0
    weights = open_lazy(read_only_view)
    assert weights["w"].materialize().sum().item() == 64 * 64
    weights.close()
    assert_one_line_error(
        cli("tag", read_only_view, "v1"), str(read_only_view), "read-only", exit_code=ENVIRONMENT
    )
    model = write_safetensors(tmp_path / "n.safetensors", {"w": RawTensor("F32", (8, 8), bytes(256))})
    assert_one_line_error(cli("pack", model, "--store", read_only_view), "read-only", exit_code=ENVIRONMENT)


def test_init_on_a_read_only_mount_is_an_environment_failure(read_only_view: Path) -> None:
    assert_one_line_error(cli("init", read_only_view / "new"), "read-only", exit_code=ENVIRONMENT)


@pytest.fixture
def lock_file_denied(monkeypatch) -> None:
    """LMDB as a user who may read the store's files but not open lock.mdb for writing."""
    real_open = lmdb.open

    def refusing(path, *args, **kwargs):
        if kwargs.get("lock", True):
            raise lmdb.ReadonlyError(f"{path}/lock.mdb: {os.strerror(errno.EACCES)}")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(lmdb, "open", refusing)


def test_reader_without_access_to_the_lock_file_reads_unlocked(
    store_path: Path, tmp_path: Path, request
) -> None:
    model = write_safetensors(tmp_path / "m.safetensors", {"w": ONES})
    assert cli("pack", model, "--store", store_path).exit_code == 0
    request.getfixturevalue("lock_file_denied")
    with Repository.open(store_path, readonly=True) as repo:
        assert repo.store.lockless
        assert list(repo.refs()) == ["main"]
    assert cli("verify", "--deep", store_path).exit_code == 0
    with pytest.raises(EnvironmentFailure, match="permission denied") as caught:
        Repository.open(store_path)
    assert str(store_path) in str(caught.value)
    assert_one_line_error(cli("tag", store_path, "v1"), "permission denied", exit_code=ENVIRONMENT)


def test_writer_on_a_read_only_open_is_refused_with_the_environment_code(
    store_path: Path, tmp_path: Path
) -> None:
    model = write_safetensors(tmp_path / "m.safetensors", {"w": ONES})
    with Repository.open(store_path, readonly=True) as repo, pytest.raises(EnvironmentFailure):
        pack(repo, [model])

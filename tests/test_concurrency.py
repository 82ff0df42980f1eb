"""Readers in other processes while a writer packs, applies, rolls back and collects garbage; stale
LMDB readers of killed processes; a store and a lazy model carried across fork().

Readers must never see an error or a wrong byte: each load is pinned (gc keeps its snapshot), and
every tensor it materializes must hash to the same version's bytes. `pytest -m slow` runs 60 s.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import blockstore.storage.lmdb
from blockstore.core.source import read_range, read_safetensors
from blockstore.errors import InvalidArgument, WriterActive
from blockstore.ops.gc import gc
from blockstore.ops.pack import pack
from blockstore.patches import apply, rollback
from blockstore.repo import Repository
from blockstore.runtime import lazy

from .faults import RUN_CLI, write_version
from .helpers import cli

READERS = 4
SMALL_MAP = 1 << 20
"""Initial map for the writer and the readers: a few packs outgrow it, so the map grows under load."""


def version_hashes(path: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes in a safetensors file (what a reader must see)."""
    source = read_safetensors(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return {
            t.name: hashlib.sha256(read_range(fd, source.data_start + t.begin, t.nbytes, path)).hexdigest()
            for t in source.tensors
        }
    finally:
        os.close(fd)


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def read_in_a_loop(store: str, versions: list[dict[str, str]], seconds: float) -> dict[str, object]:
    """A reader process: open main lazily, materialize every tensor, check it, close; repeat."""
    blockstore.storage.lmdb.INITIAL_MAP_SIZE = SMALL_MAP
    loads, tensors, checked_bytes, errors = 0, 0, 0, []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with lazy.open(store, workers=2) as state:
                seen = {}
                for name in state:
                    tensor = state[name].materialize()
                    seen[name] = tensor_sha256(tensor)
                    checked_bytes += tensor.nbytes
                if not any(seen == version for version in versions):
                    errors.append(f"load {loads}: tensors match no single version")
                tensors += len(seen)
                loads += 1
        except Exception as exc:  # a reader reports every failure instead of dying of the first
            errors.append(f"load {loads}: {type(exc).__name__}: {exc}")
    return {
        "loads": loads,
        "tensors": tensors,
        "bytes": checked_bytes,
        "errors": errors[:5],
        "failed": len(errors),
    }


@pytest.mark.parametrize("seconds", [6.0, pytest.param(60.0, marks=pytest.mark.slow)])
def test_readers_never_see_an_error_or_a_wrong_byte(
    tmp_path: Path, seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blockstore.storage.lmdb, "INITIAL_MAP_SIZE", SMALL_MAP)
    models = [write_version(tmp_path / f"v{i}.safetensors", changed_seed=i) for i in range(3)]
    versions = [version_hashes(model) for model in models]
    publisher, store = tmp_path / "publisher", tmp_path / "store"
    bundles = []
    with Repository.init(publisher, chunk_size=16384) as repo:
        ids = [pack(repo, [model]).snapshot_id.hex() for model in models]
    for index in range(3):
        bundle = tmp_path / f"{index}.bsp"
        assert cli("diff", publisher, ids[index], ids[(index + 1) % 3], "-o", bundle).exit_code == 0
        bundles.append(bundle)
    with Repository.init(store, chunk_size=16384) as repo:
        pack(repo, [models[0]])

    context = multiprocessing.get_context("spawn")
    with context.Pool(READERS) as pool:
        readers = [pool.apply_async(read_in_a_loop, (str(store), versions, seconds)) for _ in range(READERS)]
        writes = {"packs": 0, "applies": 0, "rollbacks": 0, "gcs": 0, "gc_retries": 0}
        deadline = time.monotonic() + seconds
        step = 0
        with Repository.open(store) as repo:
            while time.monotonic() < deadline:
                index = step % 3
                pack(repo, [models[index]])
                writes["packs"] += 1
                apply(repo, bundles[index])
                writes["applies"] += 1
                rollback(repo)
                writes["rollbacks"] += 1
                try:
                    gc(repo, keep=0)
                    writes["gcs"] += 1
                except WriterActive:  # a reader pinned a snapshot this gc planned to delete
                    writes["gc_retries"] += 1
                step += 1
            map_size = repo.store.usage()["map_size"]
        results = [reader.get(timeout=seconds + 120) for reader in readers]
    loads = sum(r["loads"] for r in results)
    errors = [e for r in results for e in r["errors"]]
    tensors = sum(r["tensors"] for r in results)
    print(
        f"\n{READERS} readers x {seconds:.0f} s: {loads} loads, {tensors} tensors, "
        f"{sum(r['bytes'] for r in results) / 1e6:.0f} MB checked, "
        f"{sum(r['failed'] for r in results)} errors; writer: {writes}; map grew to {map_size >> 20} MiB"
    )
    assert not errors, errors
    assert all(r["loads"] > 0 for r in results)
    assert writes["gcs"] > 0 and map_size > SMALL_MAP
    with Repository.open(store) as repo:
        assert not repo.store.pinned_snapshots(), "a reader left its pin behind"


HOLD_A_READ = """
import sys, time
from pathlib import Path
from blockstore.storage.lmdb import LmdbStore
store = LmdbStore(Path(sys.argv[1]))
txn = store.env.begin()
txn.get(b"x")
print("holding", flush=True)
time.sleep(600)
"""


def test_stale_readers_of_killed_processes_are_cleared(tmp_path: Path, store_path: Path) -> None:
    """A reader slot of a killed process pins old pages until someone clears it. (When the last
    process leaves, LMDB resets the table itself; so this process keeps the store open meanwhile.)"""
    with Repository.open(store_path):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_A_READ, str(store_path)], stdout=subprocess.PIPE
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"holding"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        doctor = [sys.executable, "-c", RUN_CLI, "doctor", str(store_path), "--json"]
        first = json.loads(subprocess.run(doctor, capture_output=True, check=True).stdout)
        assert first["stale_readers_cleared"] == 1, first
        again = json.loads(subprocess.run(doctor, capture_output=True, check=True).stdout)
        assert again["stale_readers_cleared"] == 0, again


def use_in_child(state: lazy.LazyStateDict, store: Path, cached: str, uncached: str) -> int:
    """Exit status for a forked child: 0 when what the parent decoded is usable and the store gives
    a clear error instead of a copied LMDB handle; 1 otherwise (with the reason on stderr)."""
    try:
        assert state[cached].materialize().numel() > 0  # decoded before the fork: plain memory
        for attempt in (lambda: state[uncached].materialize(), lambda: lazy.open(store)):
            try:
                attempt()
            except InvalidArgument as exc:
                assert "fork" in str(exc), str(exc)
            else:
                raise AssertionError("a store handle crossed fork()")
        state.close()  # must not release the parent's pin or close its environment
    except BaseException as exc:  # the child must never unwind into the parent's pytest
        print(f"child: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def test_a_store_is_not_reused_across_fork(tmp_path: Path, store_path: Path) -> None:
    model = write_version(tmp_path / "v.safetensors", changed_seed=1)
    with Repository.open(store_path) as repo:
        pack(repo, [model], chunk_size=16384)
    expected = version_hashes(model)
    state = lazy.open(store_path, workers=2)
    try:
        state["layers.0.mlp.weight"].materialize()  # the decode threads and the store handle exist now
        pid = os.fork()
        if pid == 0:
            os._exit(use_in_child(state, store_path, "layers.0.mlp.weight", "layers.1.mlp.weight"))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "see the child's reason above"
        with Repository.open(store_path) as repo:
            assert repo.store.pinned_snapshots() == {state.snapshot_id}, "the child released the parent's pin"
        assert all(tensor_sha256(state[name].materialize()) == digest for name, digest in expected.items())
    finally:
        state.close()
    with Repository.open(store_path) as repo:
        assert not repo.store.pinned_snapshots()

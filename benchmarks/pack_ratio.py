"""Ratio, pack and decode throughput and drift of every tier on a real model, against zstd and ZipNN.

On the same weights — the model as shipped and a bf16 cast of it — measures:
- blockstore with the static side at each tier (`lossless`, `int8`, `fp8`, `int4`; the dynamic side
  is always lossless) and with the plain `zstd` codec: whole-model ratio (stored / raw), pack MB/s,
  load MB/s (the store opened, every tensor loaded with `load_all` on the runtime's threads, the
  store closed; warm page cache), decode MB/s (the same `load_all` with the store's pages already
  mapped), 1-thread decode MB/s (every chunk, already read from the store, decoded on one thread
  into a new tensor), and for the lossy tiers the worst per-tensor relative
  error and the end-to-end drift (`check-drift`'s metrics, with the tokenizer found beside the
  model, if any);
- plain zstd level 3 over all tensor bytes (one frame, one thread);
- ZipNN (when the `zipnn` package is installed) over the same bytes, with its default threads
  (and with one for the 1-thread figure).
For zstd and ZipNN, a load reads the compressed file (warm page cache) and decompresses it; a
decode starts from the compressed bytes in memory.
Decode figures are medians of 11 runs, each into newly allocated memory (as a load is); ratios are
over the tensor data (headers excluded). Prints a table, or JSON with --json.

    python -m blockstore.benchmarks.pack_ratio [MODEL.safetensors] [--tiers lossless,int8] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zstandard
from safetensors.torch import load_file, save_file

from blockstore import runtime
from blockstore.core.chunks import decode_chunk_into
from blockstore.core.policy import TIERS, Policy
from blockstore.ops.pack import pack
from blockstore.repo import Repository
from blockstore.runtime.drift import check_drift

from .models import bundled_minilm, dominant_float_dtype, zipnn_coder


def bf16_cast(source: Path, out_dir: Path) -> Path:
    """The model cast to bf16 (integers kept), with config.json copied beside it."""
    tensors = {
        name: t.to(torch.bfloat16) if t.is_floating_point() else t
        for name, t in load_file(str(source)).items()
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if (source.parent / "config.json").is_file():
        shutil.copy(source.parent / "config.json", out_dir / "config.json")
    return out_dir / "model.safetensors"


DECODE_RUNS = 11


def _median_mb_s(nbytes: int, decode: Callable[[], object]) -> float:
    """Median throughput of `decode` over DECODE_RUNS runs (the first warms per-thread contexts).

    Every run's result is kept until the median is taken, so no run decodes into memory an earlier
    one freed: a load gets fresh pages from the kernel and pays their faults, and freed memory an
    allocator hands straight back (which ZipNN's output reached on some runs and not others, for
    2x swings) would measure something no load sees. Costs DECODE_RUNS times the model in memory."""
    kept = [decode()]
    seconds = []
    for _ in range(DECODE_RUNS):
        started = time.perf_counter()
        kept.append(decode())
        seconds.append(time.perf_counter() - started)
    del kept
    return nbytes / 1e6 / statistics.median(seconds)


def _load_and_decode_mb_s(store: Path) -> tuple[float, float]:
    """(load, decode) MB/s of every tensor on the runtime's threads: a load opens and closes the
    store around `load_all`; a decode runs `load_all` while another handle keeps the store's map
    in this process, so its pages are already mapped, as ZipNN's bytes are already in memory."""

    def load_all() -> dict[str, torch.Tensor]:
        with runtime.open(store) as state:
            return state.load_all()

    with Repository.open(store, readonly=True) as repo:
        nbytes = sum(entry.nbytes for entry in repo.snapshot(repo.resolve(None)).tensors.values())
    load = _median_mb_s(nbytes, load_all)
    with Repository.open_for_reading(store):
        decode = _median_mb_s(nbytes, load_all)
    return load, decode


def _decode_one_thread_mb_s(store: Path) -> float:
    """The codec alone: stored values are read first, then decoded on this thread."""
    with Repository.open(store, readonly=True) as repo:
        tensors = [
            (entry, list(repo.stored_values(chunk.key for chunk in entry.chunks)))
            for entry in repo.snapshot(repo.resolve(None)).tensors.values()
        ]

    def decode_all() -> list[torch.Tensor]:
        """Every tensor into new memory, all kept until the end as a load keeps them (and as ZipNN's
        one output buffer is new): freeing each at once would let the allocator hand the same,
        already faulted-in pages to the next, which a real load never gets."""
        decoded = []
        for entry, values in tensors:
            decoded.append(torch.empty(entry.nbytes, dtype=torch.uint8))
            out = decoded[-1].numpy().data
            offset = 0
            for chunk, value in zip(entry.chunks, values, strict=True):
                decode_chunk_into(chunk.key, value, out[offset : offset + chunk.raw_len])
                offset += chunk.raw_len
        return decoded

    return _median_mb_s(sum(entry.nbytes for entry, _ in tensors), decode_all)


def measure_blockstore(
    model: Path, tier: str, codec: str, work: Path, tokenizer: Path | None
) -> dict[str, Any]:
    store = work / f"store-{tier}-{codec}"
    with Repository.init(store) as repo:
        packed = pack(repo, [model], codec=codec, policy=Policy(static_tier=tier))
    load_mb_s, decode_mb_s = _load_and_decode_mb_s(store)
    row: dict[str, Any] = {
        "ratio": packed.ratio,
        "pack_mb_s": packed.raw_bytes / 1e6 / packed.seconds,
        "load_mb_s": load_mb_s,
        "decode_mb_s": decode_mb_s,
        "decode_1t_mb_s": _decode_one_thread_mb_s(store),
    }
    lossy = [group for key, group in packed.groups.items() if key.endswith(f"/{tier}") and tier != "lossless"]
    if lossy:
        row["worst_rel_error"] = max(group.worst_rel_error or 0.0 for group in lossy)
        if (model.parent / "config.json").is_file():
            report = check_drift(store, reference=model, tokenizer=tokenizer)
            row["drift"] = report.metrics
    shutil.rmtree(store)
    return row


def _tensor_bytes(model: Path) -> tuple[bytes, str]:
    tensors = load_file(str(model))
    data = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())
    return data, dominant_float_dtype(tensors)


def measure_plain_zstd(data: bytes, work: Path) -> dict[str, float]:
    started = time.perf_counter()
    frame = zstandard.ZstdCompressor(level=3).compress(data)
    compress_seconds = time.perf_counter() - started
    stored = work / "model.zst"
    stored.write_bytes(frame)
    decompress = zstandard.ZstdDecompressor().decompress
    decode_mb_s = _median_mb_s(len(data), lambda: decompress(frame))
    return {
        "ratio": len(frame) / len(data),
        "pack_mb_s": len(data) / 1e6 / compress_seconds,
        "load_mb_s": _median_mb_s(len(data), lambda: decompress(stored.read_bytes())),
        "decode_mb_s": decode_mb_s,
        "decode_1t_mb_s": decode_mb_s,
    }


def measure_zipnn(data: bytes, dtype: str, work: Path) -> dict[str, float] | None:
    try:
        coder = zipnn_coder(dtype)
    except ImportError:
        return None
    started = time.perf_counter()
    packed = coder.compress(bytearray(data))
    compress_seconds = time.perf_counter() - started
    assert bytes(coder.decompress(packed)) == data, "ZipNN did not round-trip"
    stored = work / "model.znn"
    stored.write_bytes(packed)
    return {
        "ratio": len(packed) / len(data),
        "pack_mb_s": len(data) / 1e6 / compress_seconds,
        "load_mb_s": _median_mb_s(len(data), lambda: coder.decompress(stored.read_bytes())),
        "decode_mb_s": _median_mb_s(len(data), lambda: coder.decompress(packed)),
        "decode_1t_mb_s": _median_mb_s(len(data), lambda: zipnn_coder(dtype, threads=1).decompress(packed)),
    }


def run(model: Path, tiers: tuple[str, ...] = TIERS) -> dict[str, dict[str, dict[str, Any]]]:
    tokenizer = model.parent if (model.parent / "tokenizer.json").is_file() else None
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = {"as shipped": model, "bf16 cast": bf16_cast(model, work / "bf16")}
        for label, path in variants.items():
            rows = {
                f"blockstore {tier}": measure_blockstore(path, tier, "bytegroup+zstd", work, tokenizer)
                for tier in tiers
            }
            rows["blockstore zstd codec"] = measure_blockstore(path, "lossless", "zstd", work, tokenizer)
            data, dtype = _tensor_bytes(path)
            rows["plain zstd -3"] = measure_plain_zstd(data, work)
            zipnn = measure_zipnn(data, dtype, work)
            if zipnn is not None:
                rows["ZipNN"] = zipnn
            results[label] = rows
    return results


def _drift_cell(row: dict[str, Any]) -> str:
    drift = row.get("drift", {})
    if "min_cosine" in drift:
        return f"cos {drift['min_cosine']:.5f}"
    if "ppl_increase" in drift:
        return f"ppl {drift['ppl_increase']:+.2%}, top1 {drift['top1_agreement']:.3f}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="safetensors file (default: bundled MiniLM)")
    parser.add_argument("--tiers", default=",".join(TIERS), help="comma-separated tiers to measure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.model or bundled_minilm(), tuple(args.tiers.split(",")))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    columns = (
        f"{'ratio':>7} {'pack MB/s':>10} {'load MB/s':>10} {'decode MB/s':>12} {'1 thread':>9}"
        f" {'rel err':>8}  drift"
    )
    print(f"{'variant':11} {'method':22} {columns}")
    for label, methods in results.items():
        for method, row in methods.items():
            error = f"{row['worst_rel_error']:8.1e}" if "worst_rel_error" in row else " " * 8
            figures = (
                f"{row['ratio']:7.4f} {row['pack_mb_s']:10.0f} {row['load_mb_s']:10.0f}"
                f" {row['decode_mb_s']:12.0f} {row['decode_1t_mb_s']:9.0f} {error}"
            )
            print(f"{label:11} {method:22} {figures}  {_drift_cell(row)}")


if __name__ == "__main__":
    main()

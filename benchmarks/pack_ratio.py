"""Compression ratio and pack/export throughput of the lossless codecs on a real model.

Measures, on the same bytes: blockstore's `bytegroup+zstd` and `zstd` codecs (pack and export,
end to end through the store) and plain zstd level 3 over the whole file's data (one call, one
thread) as the baseline. By default runs on all-MiniLM-L6-v2 as shipped (fp32) and on a bf16 cast
of it. Prints a table, or JSON with --json.

    python -m blockstore.benchmarks.pack_ratio [MODEL.safetensors] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import zstandard
from safetensors.torch import load_file, save_file

from blockstore.export import export
from blockstore.pack import pack
from blockstore.repo import Repository

from .models import bundled_minilm


def bf16_cast(source: Path, out: Path) -> Path:
    tensors = {
        name: t.to(torch.bfloat16) if t.is_floating_point() else t
        for name, t in load_file(str(source)).items()
    }
    save_file(tensors, str(out), metadata={"format": "pt"})
    return out


def measure_codec(model: Path, codec: str, work: Path) -> dict[str, float]:
    store = work / f"store-{codec}"
    with Repository.init(store) as repo:
        packed = pack(repo, [model], codec=codec)
        started = time.perf_counter()
        export(repo, packed.snapshot_id, work / "export.safetensors")
        export_seconds = time.perf_counter() - started
    return {
        "ratio": packed.ratio,
        "pack_mb_s": packed.raw_bytes / 1e6 / packed.seconds,
        "export_mb_s": packed.raw_bytes / 1e6 / export_seconds,
    }


def measure_plain_zstd(model: Path) -> dict[str, float]:
    data = model.read_bytes()
    started = time.perf_counter()
    frame = zstandard.ZstdCompressor(level=3).compress(data)
    compress_seconds = time.perf_counter() - started
    started = time.perf_counter()
    zstandard.ZstdDecompressor().decompress(frame)
    decompress_seconds = time.perf_counter() - started
    return {
        "ratio": len(frame) / len(data),
        "pack_mb_s": len(data) / 1e6 / compress_seconds,
        "export_mb_s": len(data) / 1e6 / decompress_seconds,
    }


def run(model: Path) -> dict[str, dict[str, dict[str, float]]]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = {"fp32 (as shipped)": model, "bf16 cast": bf16_cast(model, work / "bf16.safetensors")}
        for index, (label, path) in enumerate(variants.items()):
            (work / str(index)).mkdir()
            results[label] = {
                "bytegroup+zstd": measure_codec(path, "bytegroup+zstd", work / str(index)),
                "zstd (blockstore, 4 MiB chunks)": measure_codec(path, "zstd", work / str(index)),
                "plain zstd -3 (whole file, 1 thread)": measure_plain_zstd(path),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="safetensors file (default: bundled MiniLM)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.model or bundled_minilm())
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'variant':18} {'method':36} {'ratio':>7} {'pack MB/s':>10} {'export MB/s':>12}")
    for label, methods in results.items():
        for method, row in methods.items():
            figures = f"{row['ratio']:7.4f} {row['pack_mb_s']:10.0f} {row['export_mb_s']:12.0f}"
            print(f"{label:18} {method:36} {figures}")


if __name__ == "__main__":
    main()

"""Pack and load throughput against an S3-compatible server, next to a plain file copy.

Against the server named by AWS_ENDPOINT_URL (credentials from the usual AWS variables), with an
empty `s3://BUCKET/PREFIX`: pack the model there (PUT), materialize every tensor lazily from a fresh
client with no cache (GET), then again through a read-through cache, twice (cold: fills it; warm:
served from it). The baseline is `shutil.copyfile` of the safetensors file on local disk. Rates are
raw model bytes per second (what a user waits for) and wire bytes per second (stored bytes moved).

    python -m blockstore.benchmarks.objectstore s3://BUCKET/PREFIX [MODEL.safetensors] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from blockstore.ops.pack import pack
from blockstore.repo import Repository
from blockstore.runtime import lazy

from .models import bundled_minilm


def _timed_load(url: str, cache: Path | None) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    with lazy.open(url, cache=cache) as state:
        for name in state:
            state[name].materialize()
        seconds = time.perf_counter() - started
        stats = state.stats()
        requests = state.repo.request_counts()
    return seconds, {"bytes_read": stats.bytes_read, "requests": requests}


def run(url: str, model: Path) -> dict[str, Any]:
    raw = model.stat().st_size
    with tempfile.TemporaryDirectory() as scratch:
        copy_started = time.perf_counter()
        shutil.copyfile(model, Path(scratch) / "copy.safetensors")
        copy_s = time.perf_counter() - copy_started
        with Repository.init(url) as repo:
            started = time.perf_counter()
            result = pack(repo, [model])
            pack_s = time.perf_counter() - started
            puts = repo.request_counts()["PUT"]
        load_s, load = _timed_load(url, None)
        cache = Path(scratch) / "cache"
        cold_s, _ = _timed_load(url, cache)
        warm_s, warm = _timed_load(url, cache)

    def rate(nbytes: int, seconds: float) -> float:
        return round(nbytes / 1e6 / seconds, 1)

    return {
        "model_mb": round(raw / 1e6, 1),
        "stored_mb": round(result.new_bytes / 1e6, 1),
        "file_copy": {"seconds": round(copy_s, 3), "mb_s": rate(raw, copy_s)},
        "pack_put": {
            "seconds": round(pack_s, 3),
            "model_mb_s": rate(raw, pack_s),
            "wire_mb_s": rate(result.new_bytes, pack_s),
            "puts": puts,
        },
        "load_get": {
            "seconds": round(load_s, 3),
            "model_mb_s": rate(raw, load_s),
            "wire_mb_s": rate(load["bytes_read"], load_s),
            "gets": load["requests"]["GET"],
        },
        "load_cache_cold": {"seconds": round(cold_s, 3), "model_mb_s": rate(raw, cold_s)},
        "load_cache_warm": {
            "seconds": round(warm_s, 3),
            "model_mb_s": rate(raw, warm_s),
            "gets": warm["requests"]["GET"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="an empty s3://BUCKET/PREFIX (AWS_ENDPOINT_URL names the server)")
    parser.add_argument("model", nargs="?", type=Path, help="a .safetensors file (default: MiniLM)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.url, args.model or bundled_minilm())
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, row in results.items():
        print(f"{name:16} {row}")


if __name__ == "__main__":
    main()

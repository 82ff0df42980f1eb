"""The regression gate: compare two evidence packs metric by metric, with tolerances.

Every metric measured here is lower-is-better (seconds, megabytes). A metric regresses when its new
median exceeds the baseline's by more than its relative tolerance *and* by more than an absolute
noise floor (a 10 % change of a 2 ms open is noise, not a regression). Packs from different
machines or software are refused unless the caller allows it, naming the fields that differ.
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
}
NOISE_FLOOR = {"s": 0.005, "MB": 1.0}
FINGERPRINT = ("cpu_model", "cpu_cores", "ram_bytes", "gpus", "cuda", "python")


@dataclass(frozen=True)
class GateRow:
    method: str
    metric: str
    baseline: float
    new: float
    tolerance: float
    passed: bool

    @property
    def change(self) -> float:
        return self.new / self.baseline - 1 if self.baseline else 0.0


def load_tolerances(path: Path | None) -> dict[str, float]:
    """Defaults, overridden by a TOML file of `metric = relative tolerance` lines."""
    if path is None:
        return dict(DEFAULT_TOLERANCES)
    values = read_toml(path)
    for key, value in values.items():
        if key not in DEFAULT_TOLERANCES or not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidArgument(f"{path}: {key!r} is not a metric with a numeric tolerance")
    return {**DEFAULT_TOLERANCES, **{key: float(value) for key, value in values.items()}}


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
    """Compare every method and metric both packs hold; the caller fails on any row not passed."""
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
            metric = key.split(":")[-1]
            theirs = new_results["results"].get(method, {}).get(key)
            if metric not in tolerances or theirs is None:
                continue
            before, after = row["median"], theirs["median"]
            floor = NOISE_FLOOR.get(unit_of(metric), 0.0)
            regressed = after > before * (1 + tolerances[metric]) and after - before > floor
            rows.append(GateRow(method, key, before, after, tolerances[metric], not regressed))
    return rows

"""Smoke test: the ratio benchmark runs end to end and reports sane figures on a small model."""

from __future__ import annotations

from pathlib import Path

from blockstore.benchmarks.pack_ratio import run

from .helpers import random_tensor, write_safetensors


def test_pack_ratio_benchmark_runs(tmp_path: Path) -> None:
    model = write_safetensors(tmp_path / "m.safetensors", {"w": random_tensor("F32", (64, 64))})
    results = run(model)
    assert set(results) == {"fp32 (as shipped)", "bf16 cast"}
    for methods in results.values():
        assert len(methods) == 3
        assert all(row["ratio"] > 0 and row["pack_mb_s"] > 0 for row in methods.values())

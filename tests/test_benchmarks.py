"""Smoke tests: the benchmarks run end to end and report sane figures on small models."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from blockstore.benchmarks import runtime_load
from blockstore.benchmarks.pack_ratio import run

from .helpers import RawTensor, write_safetensors


def test_pack_ratio_benchmark_runs_every_tier(tmp_path: Path) -> None:
    weights = (torch.randn(256, 256) * 0.02).numpy().tobytes()
    model = write_safetensors(
        tmp_path / "m.safetensors", {"mlp.weight": RawTensor("F32", (256, 256), weights)}
    )
    results = run(model, ("lossless", "int8"))
    assert set(results) == {"as shipped", "bf16 cast"}
    for methods in results.values():
        assert {"blockstore lossless", "blockstore int8", "plain zstd -3"} <= set(methods)
        assert all(row["ratio"] > 0 and row["decode_mb_s"] > 0 for row in methods.values())
        assert methods["blockstore int8"]["ratio"] < methods["blockstore lossless"]["ratio"]
        assert 0 < methods["blockstore int8"]["worst_rel_error"] < 0.01


def test_runtime_load_benchmark_runs_every_method(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config.architectures = ["BertModel"]
    save_file(transformers.BertModel(config).state_dict(), tmp_path / "model.safetensors")
    config.save_pretrained(tmp_path)
    report = runtime_load.run(tmp_path / "model.safetensors", runs=1)
    assert set(report["results"]) == {"blockstore", "load_file", "safe_open"}
    for method, metrics in report["results"].items():
        assert {"forward:first_forward_s", "full:open_s", "full:full_s", "full:peak_rss_mb"} <= set(metrics)
        assert all(row["median"] > 0 for key, row in metrics.items() if key != "full:open_s"), method
    assert report["ratio_to_load_file"]["load_file"]["full:full_s"] == 1.0

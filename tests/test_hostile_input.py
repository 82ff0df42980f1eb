"""Crafted input that used to hang, trace back, switch a gate off or reach the terminal and the
filesystem: each is refused with one line (or, for a killed export's leftovers, cleaned up)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from blockstore.core.manifests import ManifestError, Snapshot, unsafe_character
from blockstore.core.policy import MAX_GLOB_CHARS, MAX_POLICY_BYTES, MAX_RULES, Policy, load_policy
from blockstore.core.source import read_safetensors
from blockstore.errors import BlockstoreError, InvalidArgument
from blockstore.ops.export import export, remove_stale_partials
from blockstore.repo import Repository, check_ref_name

from .helpers import RawTensor, assert_one_line_error, cli, random_tensor, write_raw_file, write_safetensors


def finishes(call: Callable[[], object], fifo: Path, seconds: float = 30) -> object:
    """`call()`'s result or exception; if it blocks on `fifo` instead, unblock it and fail."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test below
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a reader waits: this succeeds
        os.close(writer)  # the reader now sees end of file and the thread can finish
        thread.join(seconds)
        pytest.fail(f"hung reading the FIFO {fifo}")
    return outcome[0]


def model(tmp_path: Path, name: str = "m.safetensors") -> Path:
    return write_safetensors(tmp_path / name, {"w": random_tensor("F32", (8, 8))})


# --- item 4: FIFOs and other non-regular files are refused, not waited on ------------------------


def test_a_fifo_given_as_policy_is_refused(tmp_path: Path, store_path: Path) -> None:
    fifo = tmp_path / "policy.toml"
    os.mkfifo(fifo)
    outcome = finishes(lambda: load_policy(fifo), fifo)
    assert isinstance(outcome, BlockstoreError) and "is a FIFO, not a regular file" in str(outcome)
    result = finishes(lambda: cli("pack", model(tmp_path), "--store", store_path, "--policy", fifo), fifo)
    assert_one_line_error(result, str(fifo), "a FIFO", exit_code=2)


@pytest.mark.parametrize("layout", ["given", "model.safetensors", "glob"])
def test_a_fifo_named_safetensors_is_refused(tmp_path: Path, store_path: Path, layout: str) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    fifo = directory / ("x.safetensors" if layout != "model.safetensors" else "model.safetensors")
    os.mkfifo(fifo)
    target = fifo if layout == "given" else directory
    outcome = finishes(lambda: read_safetensors(fifo), fifo)
    assert isinstance(outcome, BlockstoreError) and "a FIFO" in str(outcome)
    result = finishes(lambda: cli("pack", target, "--store", store_path), fifo)
    assert_one_line_error(result, str(fifo), "is a FIFO, not a regular file", exit_code=2)
    assert cli("ls", store_path, "--json").json()["refs"] == {}


def test_a_character_device_as_policy_is_refused(tmp_path: Path, store_path: Path) -> None:
    """A device is not a policy (/dev/zero, read whole, would fill memory; /dev/null stands in)."""
    result = cli("pack", model(tmp_path), "--store", store_path, "--policy", "/dev/null")
    assert_one_line_error(result, "/dev/null", "is a character device, not a regular file", exit_code=2)


# --- item 4: policy files and globs are bounded --------------------------------------------------


def test_an_oversized_policy_file_is_refused(tmp_path: Path, store_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("# padding\n" * (MAX_POLICY_BYTES // 10 + 1) + '[static]\ntier = "lossless"\n')
    result = cli("pack", model(tmp_path), "--store", store_path, "--policy", path)
    assert_one_line_error(result, str(path), f"more than the {MAX_POLICY_BYTES}-byte limit", exit_code=2)


def test_a_long_glob_is_refused_in_a_file_and_on_the_command_line(tmp_path: Path, store_path: Path) -> None:
    glob = "*a" * (MAX_GLOB_CHARS // 2 + 1)
    path = tmp_path / "policy.toml"
    path.write_text(f'[[rule]]\nmatch = "w"\n[[rule]]\nmatch = "{glob}"\nside = "static"\n')
    with pytest.raises(InvalidArgument, match=rf"policy.toml rule 2: glob .* is {len(glob)} characters"):
        load_policy(path)
    result = cli("pack", model(tmp_path), "--store", store_path, "--policy", path)
    assert_one_line_error(result, str(path), "rule 2", f"more than the {MAX_GLOB_CHARS} allowed")
    assert len(result.stderr) < 300  # the message shows the glob's start, not all of it
    result = cli("pack", model(tmp_path), "--store", store_path, "--static", glob)
    assert_one_line_error(result, "--static", "characters", exit_code=2)
    assert cli("ls", store_path, "--json").json()["refs"] == {}


def test_a_glob_of_many_wildcards_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"--dynamic: glob .* has 100 wildcards, more than the 64"):
        Policy().with_overrides(dynamic=["*?" * 50])


def test_too_many_rules_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[[rule]]\nmatch = "w"\n' * (MAX_RULES + 1))
    with pytest.raises(InvalidArgument, match=rf"{MAX_RULES + 1} rules, more than the {MAX_RULES}"):
        load_policy(path)


def test_globs_keep_fnmatch_semantics_and_are_compiled_once() -> None:
    policy = Policy().with_overrides(static=["*.norm.[wb]*", "layer?.x"], dynamic=["Big*"])
    rules = policy.rules
    assert [rule.matches(name) for rule in rules for name in ("a.norm.weight", "layer1.x", "BigW")] == [
        True, False, False, False, True, False, False, False, True,
    ]  # fmt: skip
    assert not rules[2].matches("bigW")  # case-sensitive, like fnmatchcase
    assert all(rule.regex is rule.regex for rule in rules)  # compiled at construction, kept


# --- item 10: shapes that overflow int64, unencodable names, deep nesting ------------------------


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ([0, 2**64], "dimension 18446744073709551616 exceeds int64"),
        ([0, 2**63], "dimension 9223372036854775808 exceeds int64"),
        ([2**62, 2, 0], "product of its non-zero dimensions exceeds int64"),
        ([0, 2**31, 2**31, 2], "product of its non-zero dimensions exceeds int64"),
    ],
)
def test_shapes_that_overflow_int64_are_refused(
    tmp_path: Path, store_path: Path, shape: list[int], fragment: str
) -> None:
    path = write_raw_file(
        tmp_path / "big.safetensors", {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
    )
    result = cli("pack", path, "--store", store_path)
    assert_one_line_error(result, str(path), "tensor 'w' has an invalid shape", fragment, exit_code=2)
    assert cli("ls", store_path, "--json").json()["refs"] == {}


def test_the_largest_int64_shape_with_a_zero_dimension_is_accepted(tmp_path: Path) -> None:
    """torch builds (0, 2**63 - 1): the bound is int64 itself, not something tighter."""
    header = {"w": {"dtype": "F32", "shape": [0, 2**63 - 1], "data_offsets": [0, 0]}}
    assert read_safetensors(write_raw_file(tmp_path / "ok.safetensors", header)).tensors[0].shape == (
        0,
        2**63 - 1,
    )


def test_a_stored_snapshot_with_an_overflowing_shape_is_refused(tmp_path: Path, repo: Repository) -> None:
    entry = ["w", "F32", [0, 2**63], "dynamic", "lossless", "raw", [], b"\0" * 32, None]
    data = msgpack.packb([2, [["m.safetensors", b"{}", ["w"]]], [entry], [], None, "", 0], use_bin_type=True)
    with pytest.raises(ManifestError, match="tensor 'w' has an invalid shape"):
        Snapshot.from_bytes(data)


def test_a_lone_surrogate_in_a_tensor_name_is_refused(tmp_path: Path, store_path: Path) -> None:
    path = write_raw_file(
        tmp_path / "s.safetensors",
        b'{"w\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
        b"\0",
    )
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    with pytest.raises(SafetensorError):  # the reference reader refuses it too
        load_file(str(path))
    result = cli("pack", path, "--store", store_path)
    assert_one_line_error(result, str(path), "lone surrogate (U+D800)", exit_code=2)


@pytest.mark.parametrize(
    "nesting", ["a = " + "[" * 50_000 + "]" * 50_000, "a = " + "{b=" * 50_000 + "1" + "}" * 50_000]
)
def test_deeply_nested_toml_is_one_line(tmp_path: Path, store_path: Path, nesting: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(nesting + "\n")
    result = cli("pack", model(tmp_path), "--store", store_path, "--policy", path)
    assert_one_line_error(result, str(path), "not valid TOML", exit_code=2)


def test_a_deeply_nested_shard_index_is_one_line(tmp_path: Path, store_path: Path) -> None:
    directory = tmp_path / "sharded"
    directory.mkdir()
    (directory / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    result = cli("pack", directory, "--store", store_path)
    assert_one_line_error(
        result, "model.safetensors.index.json", "not a valid safetensors index", exit_code=2
    )


# --- item 11: drift bounds must be finite ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[drift]\nmin_cosine = nan\n", "[drift]: min_cosine = nan is not a finite number"),
        ("[drift]\nmin_top1 = -inf\n", "[drift]: min_top1 = -inf is not a finite number"),
        ("[drift.int8]\nmax_ppl_increase = inf\n", "[drift.int8]: max_ppl_increase = inf is not a finite"),
    ],
)
def test_non_finite_drift_bounds_are_refused(
    tmp_path: Path, store_path: Path, text: str, fragment: str
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    result = cli("pack", model(tmp_path), "--store", store_path, "--policy", path)
    assert_one_line_error(result, str(path), fragment, exit_code=2)
    result = cli("check-drift", store_path, "--reference", model(tmp_path), "--policy", path)
    assert_one_line_error(result, str(path), fragment, exit_code=2)


def test_a_policy_built_in_python_refuses_a_nan_bound() -> None:
    with pytest.raises(InvalidArgument, match=r"\[drift.int8\]: min_cosine = nan is not a finite number"):
        Policy(drift={"int8": {"min_cosine": float("nan")}})


# --- item 12: names that would drive a terminal or hide what they are -----------------------------


def test_unsafe_characters_are_exactly_categories_cc_cf_and_cs() -> None:
    expected = [p for p in range(sys.maxunicode + 1) if unicodedata.category(chr(p)) in ("Cc", "Cf", "Cs")]
    found = [p for p in range(sys.maxunicode + 1) if unsafe_character(f"a{chr(p)}b")]
    assert found == expected
    assert unsafe_character("model.layers.0.mlp.weight") is None and unsafe_character("größe.gewicht") is None


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("w\u202egnp.exe", "format character (U+202E)"),
        ("w\u200bx", "format character (U+200B)"),
        ("w\u2066x", "format character (U+2066)"),
        ("w\x1b]0;title\x07", "control character (U+001B)"),
    ],
)
def test_format_characters_in_tensor_names_are_refused(
    tmp_path: Path, store_path: Path, name: str, fragment: str
) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", {name: RawTensor("U8", (1,), b"\0")})
    result = cli("pack", path, "--store", store_path)
    assert_one_line_error(result, str(path), f"has a {fragment} in its name", exit_code=2)
    assert "\x1b" not in result.stderr and "\u202e" not in result.stderr  # shown escaped
    assert cli("ls", store_path, "--json").json()["refs"] == {}


def test_a_weight_file_name_with_an_escape_is_refused(tmp_path: Path, store_path: Path) -> None:
    path = model(tmp_path, "evil\x1b[2Jname.safetensors")
    result = cli("pack", path, "--store", store_path)
    assert_one_line_error(result, "file name", "control character (U+001B)", exit_code=2)
    assert "\x1b" not in result.stderr


def _publish_raw(repo: Repository, base: Snapshot, **changes: object) -> None:
    """Put a snapshot into the store without the reader's checks (as a damaged or forged one
    would arrive), then point main at it."""
    from dataclasses import replace

    forged = replace(base, **changes)
    repo.publish(forged, "main", repo.resolve("main"), "forged")


@pytest.mark.parametrize("name", ["evil\x1b[2Jname", "config\u202enosj.json", "a\x00b"])
def test_an_extras_name_with_control_or_format_characters_never_becomes_a_file(
    tmp_path: Path, store_path: Path, name: str
) -> None:
    assert cli("pack", model(tmp_path), "--store", store_path).exit_code == 0
    with Repository.open(store_path) as repo:
        base = repo.snapshot(repo.resolve("main"))
        _publish_raw(repo, base, extras={"config.json": b"{}", name: b"payload"})
        with pytest.raises(ManifestError, match="is not a plain file name"):
            Snapshot.from_bytes(repo.store.get_snapshot_bytes(repo.resolve("main")))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("")
    result = cli("export", store_path, out)
    assert_one_line_error(result, "is not a plain file name", exit_code=4)
    assert "\x1b" not in result.stderr
    assert sorted(os.listdir(out)) == ["keep"]


def test_a_source_file_name_with_an_escape_is_refused_from_a_stored_snapshot(
    tmp_path: Path, store_path: Path
) -> None:
    assert cli("pack", model(tmp_path), "--store", store_path).exit_code == 0
    with Repository.open(store_path) as repo:
        base = repo.snapshot(repo.resolve("main"))
        renamed = tuple(type(f)("x\x9b31m.safetensors", f.header, f.tensors) for f in base.files)
        _publish_raw(repo, base, files=renamed)
    assert_one_line_error(
        cli("export", store_path, tmp_path / "out"), "is not a plain file name", exit_code=4
    )


@pytest.mark.parametrize("name", ["v1\x1b[2J", "v\u202e1", "v\u200b1", "v\ud8001"])
def test_ref_names_refuse_control_and_format_characters(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid ref name"):
        check_ref_name(name)


# --- item 13: a killed export's temporary files are removed by the next export --------------------


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_export_removes_partials_of_dead_exports_only(tmp_path: Path, store_path: Path) -> None:
    assert cli("pack", model(tmp_path), "--store", store_path).exit_code == 0
    out = tmp_path / "exported"
    out.mkdir()
    dead = dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [out / f".m.safetensors.partial-{dead}", out / f".other.bin.partial-{dead}"]
        kept = [
            out / f".m.safetensors.partial-{sleeper.pid}",  # a live process: maybe a running export
            out / f"m.safetensors.partial-{dead}",  # not export's pattern (no leading dot)
            out / f".m.safetensors.partial-{dead}x",
            out / f".partial-{dead}",
            out / f".m.safetensors.partial-0{dead}",
            out / ".m.safetensors.partial-99999999999999999999",
        ]
        for path in stale + kept:
            path.write_bytes(b"half a file")
        target = tmp_path / "elsewhere"
        target.write_bytes(b"not ours")
        link = out / f".link.partial-{dead}"
        link.symlink_to(target)
        locked = out / f".locked.partial-{dead}"
        locked.write_bytes(b"held by a writer on another host")
        holder = os.open(locked, os.O_RDONLY)
        fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            with Repository.open(store_path) as repo:
                export(repo, repo.resolve("main"), out / "m.safetensors")
        finally:
            os.close(holder)
        assert not any(path.exists() for path in stale)
        assert (
            all(path.exists() for path in kept) and link.is_symlink() and target.exists() and locked.exists()
        )
        assert (out / "m.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_killed_exports_partial_is_cleaned_by_the_cli(tmp_path: Path, store_path: Path) -> None:
    """A real export killed mid-write leaves its partial; the next `blockstore export` removes it."""
    big = write_safetensors(tmp_path / "big.safetensors", {"w": random_tensor("U8", (8 << 20,))})
    assert cli("pack", big, "--store", store_path, "--codec", "raw").exit_code == 0
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from blockstore.ops.export import export\n"
        "from blockstore.repo import Repository\n"
        "class KillMidway:\n"
        "    def start(self, desc, total): pass\n"
        "    def advance(self, amount, item=''): os.kill(os.getpid(), signal.SIGKILL)\n"
        "with Repository.open(sys.argv[1]) as repo:\n"
        "    export(repo, repo.resolve('main'), Path(sys.argv[2]), progress=KillMidway())\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, store_path, out / "big.safetensors"], check=False)
    assert killed.returncode == -9
    leftovers = list(out.glob(".big.safetensors.partial-*"))
    assert len(leftovers) == 1
    assert cli("export", store_path, out / "big.safetensors").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["big.safetensors"]


def test_cleaning_a_missing_directory_removes_nothing(tmp_path: Path) -> None:
    assert remove_stale_partials(tmp_path / "absent") == []


def test_a_bundle_whose_target_has_an_escape_in_an_extras_name_is_rejected(tmp_path: Path) -> None:
    """The issue's case: a valid, re-sealed bundle ships a snapshot whose extras name carries a
    terminal escape; apply refuses it, so it never reaches the store or, later, a file name."""
    from blockstore.core.hashing import digest

    from .test_fuzz import _sealed, _sections

    v1 = write_safetensors(tmp_path / "v1.safetensors", {"w": random_tensor("F32", (16, 16), seed=1)})
    v2 = write_safetensors(tmp_path / "v2.safetensors", {"w": random_tensor("F32", (16, 16), seed=2)})
    publisher, consumer = tmp_path / "publisher", tmp_path / "consumer"
    for store, versions in ((publisher, (v1, v2)), (consumer, (v1,))):
        assert cli("init", store).exit_code == 0
        for version in versions:
            assert cli("pack", version, "--store", store).exit_code == 0
    with Repository.open(publisher) as repo:
        first = repo.log("main")[0].new.hex()
    bundle = tmp_path / "update.bsp"
    assert cli("diff", publisher, first, "main", "-o", bundle).exit_code == 0
    preamble, header, snapshot, values = _sections(bundle.read_bytes())
    fields = msgpack.unpackb(snapshot, raw=False)
    fields[3] = [*fields[3], ["evil\x1b[2Jname", b"payload"]]
    forged = msgpack.packb(fields, use_bin_type=True)
    header["target"], header["snapshot_len"] = digest(forged), len(forged)
    bundle.write_bytes(_sealed(preamble, header, forged, values))
    with Repository.open(consumer) as repo:
        before = repo.refs()
    result = cli("apply", consumer, bundle)
    assert_one_line_error(result, "bundle rejected", "is not a plain file name", exit_code=4)
    assert "\x1b" not in result.stderr
    with Repository.open(consumer) as repo:
        assert repo.refs() == before

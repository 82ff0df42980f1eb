"""What a new user sees: pipes that close early, tables at the terminal's width, flags shown as
flags, notes, escaped untrusted text, progress bars and size units that agree."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rich.console import Console

from blockstore import patches
from blockstore.cli import output
from blockstore.cli.app import app
from blockstore.cli.commands import pack as pack_command
from blockstore.cli.progress import progress_bar
from blockstore.errors import EXIT_DAMAGED
from blockstore.ops.pack import PackResult
from blockstore.patches.diff import DiffResult

from .helpers import assert_one_line_error, cli, random_tensor, write_safetensors

BLOCKSTORE = Path(sys.executable).with_name("blockstore")
ESC = "\x1b[2J\x1b[31m"  # clear the screen, turn red


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store with two snapshots, the second with a message carrying terminal escapes."""
    location = tmp_path / "store"
    assert cli("init", location).exit_code == 0
    for seed, message in ((1, "first"), (2, f"second {ESC}owned")):
        model = write_safetensors(
            tmp_path / f"m{seed}.safetensors", {"w": random_tensor("F32", (8, 8), seed)}
        )
        assert cli("pack", model, "-s", location, "-m", message).exit_code == 0
    return location


def run_into_closed_pipe(*args: object) -> subprocess.CompletedProcess[bytes]:
    """Run the installed `blockstore` with stdout a pipe whose reader has already gone (what
    `| head -1` becomes once head has its line): every write to stdout fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [BLOCKSTORE, *map(str, args)], stdout=write_end, stderr=subprocess.PIPE, timeout=120
        )
    finally:
        os.close(write_end)


def test_ls_into_a_closed_pipe_exits_0_quietly(store: Path) -> None:
    done = run_into_closed_pipe("ls", store)
    assert (done.returncode, done.stderr.decode()) == (0, "")


def test_pack_explain_into_a_closed_pipe_exits_0_and_commits(store: Path, tmp_path: Path) -> None:
    model = write_safetensors(tmp_path / "m3.safetensors", {"w": random_tensor("F32", (8, 8), 3)})
    done = run_into_closed_pipe("pack", model, "-s", store, "--explain", "-m", "third")
    assert (done.returncode, done.stderr.decode()) == (0, "")
    assert [s["message"] for s in cli("ls", store, "--json").json()["snapshots"]][-1] == "third"


def delete_a_chunk(store: Path) -> None:
    import lmdb

    with lmdb.open(str(store), max_dbs=16) as env:
        chunks = env.open_db(b"chunks")
        with env.begin(write=True, db=chunks) as txn:
            txn.delete(next(iter(txn.cursor().iternext(values=False))))


def test_damage_still_exits_4_into_a_closed_pipe(store: Path) -> None:
    """The rest of the output is dropped, not the verdict: a damaged store stays exit 4."""
    delete_a_chunk(store)
    done = run_into_closed_pipe("verify", store)
    assert done.returncode == 4
    assert done.stderr.decode().startswith("blockstore: error: verify found 1 damaged")


def test_damaged_store_is_an_error_with_exit_code_4(store: Path) -> None:
    delete_a_chunk(store)
    result = cli("verify", store, "--json")
    assert_one_line_error(result, "verify found 1 damaged item(s)", str(store), exit_code=EXIT_DAMAGED)
    assert result.json()["clean"] is False  # stdout still holds the whole report


def test_show_table_fits_80_columns_and_keeps_long_names(tmp_path: Path, monkeypatch) -> None:
    names = [f"model.layers.{i}.self_attn.q_proj.very_long_descriptive_suffix.weight" for i in range(3)]
    model = write_safetensors(
        tmp_path / "long.safetensors",
        {name: random_tensor("BF16", (4, 4), i) for i, name in enumerate(names)},
    )
    location = tmp_path / "store"
    cli("init", location)
    cli("pack", model, "-s", location, "-m", "long names")
    monkeypatch.setenv("COLUMNS", "80")
    narrow = cli("show", location)
    assert narrow.exit_code == 0
    lines = narrow.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, narrow.stdout
    assert all(name in lines for name in names), narrow.stdout  # a line of its own, never cut
    assert "bytegroup+zstd" in narrow.stdout and "BF16" in narrow.stdout
    monkeypatch.setenv("COLUMNS", "200")
    wide = cli("show", location).stdout.splitlines()
    assert [line.split()[0] for line in wide[2:]] == names  # one line per row when they fit


ALL_COMMANDS = [
    ["init"],
    ["pack"],
    ["export"],
    ["ls"],
    ["show"],
    ["stats"],
    ["verify"],
    ["diff"],
    ["apply"],
    ["rollback"],
    ["log"],
    ["tag"],
    ["gc"],
    ["doctor"],
    ["push"],
    ["pull"],
    ["check-drift"],
    ["bench"],
    ["gate"],
    ["evidence", "verify"],
]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
def test_json_is_shown_as_a_plain_flag(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert re.search(r"^\s+--json\s+Print one JSON object", result.stdout, re.MULTILINE), result.stdout
    assert "--no-json" not in result.stdout and "--json <bool>" not in result.stdout


@dataclass(frozen=True)
class _NotedPack(PackResult):
    notes: list[str] = field(default_factory=list)


def test_pack_notes_go_to_stderr_and_into_the_json(store: Path, tmp_path: Path, monkeypatch) -> None:
    real_pack = pack_command.pack_model

    def pack_with_a_note(*args, **kwargs):
        result = real_pack(*args, **kwargs)
        return _NotedPack(**{**vars(result), "notes": ["--codec raw cannot take effect: chunks exist"]})

    monkeypatch.setattr(pack_command, "pack_model", pack_with_a_note)
    model = tmp_path / "m1.safetensors"
    text = cli("pack", model, "-s", store)
    assert text.exit_code == 0
    assert text.stderr == "blockstore: note: --codec raw cannot take effect: chunks exist\n"
    assert "blockstore: note" not in text.stdout
    as_json = cli("pack", model, "-s", store, "--json")
    assert as_json.json()["notes"] == ["--codec raw cannot take effect: chunks exist"]
    assert as_json.stderr.startswith("blockstore: note: --codec raw")


@dataclass(frozen=True)
class _NotedDiff(DiffResult):
    notes: list[str] = field(default_factory=list)


def test_diff_notes_go_to_stderr(store: Path, tmp_path: Path, monkeypatch) -> None:
    real_diff = patches.diff

    def diff_with_a_note(*args, **kwargs):
        result = real_diff(*args, **kwargs)
        return _NotedDiff(**{**vars(result), "notes": [f"packed m1.safetensors into the store as {ESC}"]})

    monkeypatch.setattr(patches, "diff", diff_with_a_note)
    [first, second] = [s["id"] for s in cli("ls", store, "--json").json()["snapshots"]]
    result = cli("diff", store, first[:8], second[:8], "-o", tmp_path / "u.bsp")
    assert result.exit_code == 0
    [line] = result.stderr.splitlines()
    assert line == r"blockstore: note: packed m1.safetensors into the store as \x1b[2J\x1b[31m"


def test_exporting_several_files_to_a_file_name_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    write_safetensors(model / "model-00001-of-00002.safetensors", {"a": random_tensor("F16", (8,), 1)})
    write_safetensors(model / "model-00002-of-00002.safetensors", {"b": random_tensor("F16", (8,), 2)})
    location = tmp_path / "store"
    cli("init", location)
    assert cli("pack", model, "-s", location).exit_code == 0
    out = tmp_path / "out.safetensors"
    result = cli("export", location, out)
    assert_one_line_error(result, str(out), "holds 2 files", "directory", exit_code=2)
    assert not out.exists()
    assert cli("export", location, tmp_path / "out").exit_code == 0


def test_untrusted_text_is_printed_escaped(store: Path) -> None:
    for args in (["ls", store], ["log", store], ["show", f"{store}@main"]):
        result = cli(*args)
        assert result.exit_code == 0, result
        assert "\x1b" not in result.stdout, args
        assert r"\x1b[2J\x1b[31mowned" in result.stdout.replace("\n", "").replace(" ", ""), args
    assert ESC in cli("ls", store, "--json").json()["snapshots"][-1]["message"]  # JSON escapes it itself


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain ascii", "plain ascii"),
        ("café naïve 日本", "café naïve 日本"),
        ("a\x1b[0mb", r"a\x1b[0mb"),
        ("line\nbreak\ttab\r", r"line\nbreak\ttab\r"),
        ("right-to-left \u202eoverride", r"right-to-left \u202eoverride"),
        ("zero\u200bwidth", r"zero\u200bwidth"),
        ("c1 \x9b control", r"c1 \x9b control"),
    ],
)
def test_escape_control(raw: str, shown: str) -> None:
    assert output.escape_control(raw) == shown


def test_progress_bar_names_the_tensor_in_percent_and_mib() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160, color_system=None)
    with progress_bar(True, console=console) as bar:
        bar.start("pack", 4 << 20)
        bar.advance(1 << 20, "model.layers.0.mlp.weight")
        drawn = screen.getvalue()
    assert "model.layers.0.mlp.weight" in drawn
    assert "25%" in drawn
    assert "1.0/4.0 MiB" in drawn and " MB" not in drawn


def test_summaries_use_mib_like_the_bar(tmp_path: Path) -> None:
    model = write_safetensors(tmp_path / "m.safetensors", {"w": random_tensor("F32", (256, 256))})
    location = tmp_path / "store"
    cli("init", location)
    packed = cli("pack", model, "-s", location)
    exported = cli("export", location, tmp_path / "out.safetensors")
    for result in (packed, exported):
        assert "MiB/s" in result.stdout and " MB" not in result.stdout, result.stdout


def test_console_script_entry_point_and_app_are_importable() -> None:
    from blockstore.cli.app import main

    assert callable(main) and app.info.name == "blockstore"
    assert subprocess.run([BLOCKSTORE, "init", "--help"], capture_output=True).returncode == 0

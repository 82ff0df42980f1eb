"""Everything the CLI writes: text lines, tables that fit the terminal, JSON, notes and sizes.

All of stdout goes through `echo`, so a reader that leaves early (`blockstore ls STORE | head -1`)
is handled in one place: the rest of the output goes to /dev/null and the command finishes with its
own exit status (0 for a listing, still 4 for a damaged store), with no "Broken pipe" error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import unicodedata
from typing import Any, Protocol

import typer

from blockstore.storage.base import short_id

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Control, format (bidi overrides, zero-width), surrogate and line/paragraph separator characters."""


class JsonResult(Protocol):
    """A command's result: what `--json` prints is its `to_json()`."""

    def to_json(self) -> dict[str, Any]: ...


def escape_control(text: str) -> str:
    """Text from a store or a bundle (snapshot messages, tensor and ref names) made safe to print:
    control and format characters become their Python escapes (ESC prints as `\\x1b`), so printing
    a name cannot move the cursor, recolour the terminal, reorder text or hide the rest of a line."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        repr(char)[1:-1] if unicodedata.category(char) in _UNSAFE_CATEGORIES else char for char in text
    )


def _stdout_gone() -> None:
    """The reader of stdout has gone: point stdout at /dev/null so later writes (and the flush at
    exit) succeed silently (the recipe in Python's `signal` documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout (an in-process test runner)
        pass
    finally:
        os.close(devnull)


def echo(text: str = "") -> None:
    """One line (or block) on stdout."""
    try:
        typer.echo(text)
    except BrokenPipeError:
        _stdout_gone()


def flush() -> None:
    """Flush stdout before exit, under the same rule as `echo`."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()
    except ValueError:  # stdout already closed
        pass


def note(text: str) -> None:
    """Something the user should be told that is not an error: one line on stderr."""
    typer.echo(f"blockstore: note: {escape_control(text)}", err=True)


def error(text: str) -> None:
    typer.echo(f"blockstore: error: {escape_control(text)}", err=True)


def _fold(text: str, width: int) -> list[str]:
    """`text` cut into pieces of `width` characters (a name is folded, never shortened)."""
    return [text[i : i + width] for i in range(0, len(text), width)] or [""]


def print_rows(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]], numeric: set[int]) -> None:
    """A table whose first column is a name, fitted to the terminal's width (COLUMNS, else the
    terminal, else 80): one line per row when the longest name leaves room for the other columns;
    otherwise each name on a line of its own (folded, never cut, if longer than the terminal) with
    the row's other values indented beneath it. Cells are printed as given: escape them first."""
    width = shutil.get_terminal_size().columns
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def values(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(size) if i in numeric else cell.ljust(size)
            for i, (cell, size) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells[1:]).rstrip()

    echo(title)
    if widths[0] + 2 + len(values(header)) <= width:
        for row in [header, *rows]:
            echo(f"{row[0].ljust(widths[0])}  {values(row)}".rstrip())
        return
    for row in [header, *rows]:
        for piece in _fold(row[0], max(width, 1)):
            echo(piece)
        echo(f"    {values(row)}")


def print_json(payload: dict[str, Any]) -> None:
    echo(json.dumps(payload, indent=2, sort_keys=True))


def notes_of(result: object) -> list[str]:
    return [str(text) for text in getattr(result, "notes", None) or ()]


def report(result: JsonResult, as_json: bool, payload: dict[str, Any] | None = None) -> bool:
    """Print the result's notes on stderr and, with `--json`, its JSON (`payload`, by default its
    `to_json()`, with the notes under "notes") on stdout. True when the JSON was printed, so the
    command prints no text summary."""
    notes = notes_of(result)
    for text in notes:
        note(text)
    if not as_json:
        return False
    payload = result.to_json() if payload is None else payload
    if notes:
        payload.setdefault("notes", notes)
    print_json(payload)
    return True


short = short_id
"""A snapshot id as the text output shows it (12 hex digits); `(nothing)` for no snapshot."""


MIB = 1 << 20
"""Every size and rate the CLI prints is binary: MiB and MiB/s, progress bars included."""


def mib(nbytes: int) -> str:
    return f"{nbytes / MIB:,.1f} MiB"


def mib_per_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MIB / seconds:,.1f} MiB/s" if seconds > 0 else "- MiB/s"

"""`blockstore log`: a ref's history."""

from __future__ import annotations

import typer

from blockstore import patches
from blockstore.cli import output
from blockstore.cli.options import JsonOption, RefOption, StoreArgument
from blockstore.cli.output import escape_control
from blockstore.repo import Repository


def show_log(store: StoreArgument, ref: RefOption = "main", as_json: JsonOption = False) -> None:
    """The ref's history: time, old -> new, operation, message, tensors changed."""
    with Repository.open(store, readonly=True) as repo:
        entries = patches.log(repo, ref)
    rows = [entry.to_json() for entry in entries]
    if as_json:
        output.print_json({"ref": ref, "entries": rows})
        return
    for entry, row in zip(entries, rows, strict=True):
        changed = "?" if entry.tensors_changed is None else entry.tensors_changed
        output.echo(
            f"{row['time']} {output.short(entry.old)} -> {output.short(entry.new)} "
            f"{escape_control(entry.op):8} {changed} tensors changed  {escape_control(entry.message)}"
        )


def register(app: typer.Typer) -> None:
    app.command(name="log")(show_log)

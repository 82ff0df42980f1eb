"""`blockstore tag`: create a ref at a snapshot."""

from __future__ import annotations

from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption, StoreArgument
from blockstore.repo import Repository


def tag(
    store: StoreArgument,
    name: Annotated[str, typer.Argument(help="The new ref's name.")],
    target: Annotated[str, typer.Argument(help="A ref or snapshot id (prefix).")] = "main",
    as_json: JsonOption = False,
) -> None:
    """Create a ref (a tag) pointing at a snapshot; refuses to move an existing one."""
    with Repository.open(store) as repo:
        snapshot_id = repo.tag(name, target)
    if as_json:
        output.print_json({"ref": name, "snapshot": snapshot_id.hex()})
        return
    output.echo(f"{name} -> {output.short(snapshot_id)}")  # a valid ref name: nothing to escape


def register(app: typer.Typer) -> None:
    app.command()(tag)

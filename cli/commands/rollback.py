"""`blockstore rollback`: move a ref back; nothing is deleted."""

from __future__ import annotations

from typing import Annotated

import typer

from blockstore import patches
from blockstore.cli import output
from blockstore.cli.options import JsonOption, RefOption, StoreArgument
from blockstore.cli.output import escape_control
from blockstore.repo import Repository


def rollback_ref(
    store: StoreArgument,
    ref: RefOption = "main",
    to: Annotated[str | None, typer.Option("--to", help="A ref or snapshot id to move to.")] = None,
    steps: Annotated[int, typer.Option(help="Versions to step back along the ref's history.")] = 1,
    as_json: JsonOption = False,
) -> None:
    """Move a ref back (one version by default). Nothing is deleted."""
    with Repository.open(store) as repo:
        result = patches.rollback(repo, ref=ref, to=to, steps=steps)
    if output.report(result, as_json):
        return
    output.echo(f"{escape_control(result.ref)}: {output.short(result.old)} -> {output.short(result.new)}")


def register(app: typer.Typer) -> None:
    app.command(name="rollback")(rollback_ref)

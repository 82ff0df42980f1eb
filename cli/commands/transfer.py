"""`blockstore push` and `pull`: one copy between stores, in either direction."""

from __future__ import annotations

from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption, RefOption, StoreArgument
from blockstore.cli.output import escape_control
from blockstore.errors import StoreNotFound
from blockstore.ops.transfer import transfer
from blockstore.repo import Repository


def _copy(source: str, destination: str, ref: str, as_json: bool) -> None:
    """A destination that is not a store yet becomes one with the source's chunk size (so later
    packs there dedup against what was copied)."""
    with Repository.open_for_reading(source) as src:
        try:
            dst = Repository.open(destination)
        except StoreNotFound:
            dst = Repository.init(destination, chunk_size=src.chunk_size)
        with dst:
            result = transfer(src, dst, ref)
    if output.report(result, as_json):
        return
    output.echo(
        f"{escape_control(result.ref)} -> {output.short(result.snapshot)}: sent {result.chunks_sent} "
        f"chunks ({output.mib(result.bytes_sent)}); {result.chunks_present} were there already"
    )


def push(
    local: StoreArgument,
    remote: Annotated[
        str, typer.Argument(metavar="REMOTE", help="The store to copy to (s3://... or a directory).")
    ],
    ref: RefOption = "main",
    as_json: JsonOption = False,
) -> None:
    """Copy REF's snapshot to another store, sending only the chunks it lacks; then move REF there."""
    _copy(local, remote, ref, as_json)


def pull(
    remote: Annotated[
        str, typer.Argument(metavar="REMOTE", help="The store to copy from (s3://... or a directory).")
    ],
    local: StoreArgument,
    ref: RefOption = "main",
    as_json: JsonOption = False,
) -> None:
    """Copy REF's snapshot from another store, fetching only the chunks this one lacks."""
    _copy(remote, local, ref, as_json)


def register(app: typer.Typer) -> None:
    app.command()(push)
    app.command()(pull)

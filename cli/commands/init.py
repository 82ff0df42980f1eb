"""`blockstore init`: create an empty store."""

from __future__ import annotations

from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption
from blockstore.core.chunks import DEFAULT_CHUNK_SIZE
from blockstore.repo import Repository


def init(
    store: Annotated[str, typer.Argument(help="Directory (or s3://BUCKET/PREFIX) to create the store in.")],
    chunk_size: Annotated[int, typer.Option(help="Chunk size in bytes for every pack.")] = DEFAULT_CHUNK_SIZE,
    as_json: JsonOption = False,
) -> None:
    """Create an empty store."""
    Repository.init(store, chunk_size=chunk_size).close()
    if as_json:
        output.print_json({"store": str(store), "created": True})
    else:
        output.echo(f"initialised empty blockstore at {store}")


def register(app: typer.Typer) -> None:
    app.command()(init)

"""`blockstore stats`: store-wide counts and sizes."""

from __future__ import annotations

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption, StoreArgument
from blockstore.cli.output import mib
from blockstore.repo import Repository


def stats(store: StoreArgument, as_json: JsonOption = False) -> None:
    """Store-wide counts and sizes."""
    with Repository.open(store, readonly=True) as repo:
        result = repo.stats()
    if output.report(result, as_json):
        return
    counts = result.counts
    output.echo(
        f"{counts['refs']} refs, {counts['snapshots']} snapshots, {counts['chunks']} chunks "
        f"({mib(result.chunk_bytes)} stored), data file {mib(counts['file_bytes'])}"
    )
    if result.delta_chunks:
        output.echo(f"{result.delta_chunks} chunks stored as deltas ({mib(result.delta_bytes)})")


def register(app: typer.Typer) -> None:
    app.command()(stats)

"""`blockstore diff`: write a patch bundle from OLD to NEW."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blockstore import patches
from blockstore.cli import output
from blockstore.cli.options import JsonOption, KeyOption, StoreArgument
from blockstore.cli.output import mib
from blockstore.patches.bundle import read_key
from blockstore.repo import Repository


def diff(
    store: StoreArgument,
    old: Annotated[str, typer.Argument(help="Base: a ref, a snapshot id (prefix) or a safetensors file.")],
    new: Annotated[str, typer.Argument(help="Target: a ref, a snapshot id (prefix) or a safetensors file.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Bundle file to write (.bsp).")],
    key: KeyOption = None,
    deltas: Annotated[
        bool,
        typer.Option(
            help="Ship changed chunks as deltas against OLD's where smaller; --no-deltas ships whole "
            "chunks only (a version 3 bundle, for receivers whose blockstore predates delta chunks)."
        ),
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Write a patch bundle holding only the chunks OLD lacks, plus NEW's snapshot."""
    with Repository.open(store) as repo:
        result = patches.diff(repo, old, new, out, key=read_key(key) if key else None, deltas=deltas)
    if output.report(result, as_json):
        return
    changes = result.changes
    output.echo(
        f"{output.short(result.base)} -> {output.short(result.target)}: {len(changes.changed)} tensors "
        f"changed, {len(changes.added)} added, {len(changes.removed)} removed"
    )
    share = result.bundle_bytes / result.model_stored_bytes if result.model_stored_bytes else 0.0
    output.echo(
        f"wrote {out}: {result.chunks_shipped} chunks, {mib(result.bundle_bytes)} "
        f"({share:.1%} of the {mib(result.model_stored_bytes)} stored model)"
    )


def register(app: typer.Typer) -> None:
    app.command()(diff)

"""`blockstore gc`: delete what nothing reaches any more."""

from __future__ import annotations

from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption, StoreArgument
from blockstore.ops.gc import gc
from blockstore.repo import Repository


def collect_garbage(
    store: StoreArgument,
    keep: Annotated[
        int | None, typer.Option(help="Reflog positions per ref to keep restorable (default all).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Report what would be deleted; delete nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete snapshots and chunks no ref, kept reflog entry or live reader reaches."""
    with Repository.open(store) as repo:
        report = gc(repo, keep=keep, dry_run=dry_run)
    if output.report(report, as_json):
        return
    verb = "would delete" if dry_run else "deleted"
    output.echo(
        f"{verb} {len(report.deleted_snapshots)} snapshots and {report.deleted_chunks} chunks "
        f"({output.mib(report.freed_bytes)}); {report.kept_snapshots} snapshots kept"
    )


def register(app: typer.Typer) -> None:
    app.command(name="gc")(collect_garbage)

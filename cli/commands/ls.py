"""`blockstore ls`: refs and snapshots."""

from __future__ import annotations

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption, StoreArgument
from blockstore.cli.output import escape_control
from blockstore.repo import Repository


def list_store(store: StoreArgument, as_json: JsonOption = False) -> None:
    """List refs and snapshots."""
    with Repository.open(store, readonly=True) as repo:
        refs = repo.refs()
        snapshots = repo.snapshots()
    if as_json:
        output.print_json(
            {
                "refs": {name: target.hex() for name, target in refs.items()},
                "snapshots": [info.to_json() for info in snapshots],
            }
        )
        return
    for name, target in sorted(refs.items()):
        output.echo(f"ref {escape_control(name)} -> {output.short(target)}")
    for info in snapshots:
        labels = f" [{', '.join(escape_control(name) for name in info.refs)}]" if info.refs else ""
        output.echo(
            f"{output.short(info.id)} {info.tensors} tensors {output.mib(info.raw_bytes)}{labels} "
            f"{escape_control(info.message)}"
        )


def register(app: typer.Typer) -> None:
    app.command(name="ls")(list_store)

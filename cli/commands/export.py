"""`blockstore export`: rebuild the packed safetensors file(s), byte for byte."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption, split_spec
from blockstore.cli.progress import progress_bar
from blockstore.errors import InvalidArgument
from blockstore.ops.export import export as export_snapshot
from blockstore.repo import Repository


def export(
    spec: Annotated[str, typer.Argument(metavar="STORE[@REF|@ID]", help="Snapshot to export.")],
    out_arg: Annotated[
        str,
        typer.Argument(
            metavar="OUT",
            help="Output file, or a directory (existing, or ending in /): multi-file snapshots and the "
            "packed config/tokenizer files go into a directory.",
        ),
    ],
    as_json: JsonOption = False,
) -> None:
    """Rebuild the packed safetensors file(s), byte for byte."""
    path, ref = split_spec(spec)
    out = Path(out_arg)
    if out_arg.endswith(("/", os.sep)):  # Path() drops the slash that asks for a directory
        out.mkdir(parents=True, exist_ok=True)
    with (
        Repository.open_for_reading(path) as repo,
        repo.reading(ref) as snapshot_id,  # pinned: a concurrent gc cannot pull chunks from under it
    ):
        files = repo.snapshot(snapshot_id).files
        if len(files) > 1 and out.suffix == ".safetensors" and not out.is_dir():
            # Refused rather than noted: a directory named like a file breaks whatever opens it next.
            raise InvalidArgument(
                f"{out}: snapshot {output.short(snapshot_id)} holds {len(files)} files, which export "
                f"writes into a directory; name one (e.g. {out.with_suffix('')})"
            )
        with progress_bar(not as_json) as bar:
            result = export_snapshot(repo, snapshot_id, out, progress=bar)
    if output.report(result, as_json):
        return
    for written in result.paths:
        output.echo(f"wrote {written}")
    output.echo(
        f"{output.mib(result.bytes_written)} in {result.seconds:.2f} s "
        f"({output.mib_per_s(result.bytes_written, result.seconds)})"
    )


def register(app: typer.Typer) -> None:
    app.command()(export)

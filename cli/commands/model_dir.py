"""`blockstore model-dir`: the directory a serving engine starts from, written from a snapshot."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption, split_spec
from blockstore.cli.progress import progress_bar
from blockstore.storage.cache import CACHE_ENV


def model_dir(
    spec: Annotated[str, typer.Argument(metavar="STORE[@REF|@ID]", help="Snapshot to serve.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Directory to write (default: one per snapshot in ~/.cache/blockstore/models).",
        ),
    ] = None,
    warm: Annotated[
        bool,
        typer.Option(
            "--warm", help="Also read every chunk once (checked), filling the --cache of an s3:// store."
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Write a snapshot's config and tokenizer files (no weights) for an engine; print the directory.

    Serve it with `vllm serve DIR --load-format blockstore`: the loader reads the weights from the
    store named in DIR/blockstore.json, at exactly this snapshot."""
    # torch only when this command runs: every other command starts without it.
    from blockstore.runtime.engines.serving import LOAD_FORMAT, ServeOptions, WeightSource, write_model_dir

    store, ref = split_spec(spec)
    cache = os.environ.get(CACHE_ENV) or None
    directory = write_model_dir(store, ref, out, cache_dir=cache)
    warmed = None
    if warm:
        started = time.perf_counter()
        with (
            WeightSource(ServeOptions(cache_dir=cache), directory) as source,
            progress_bar(not as_json) as bar,
        ):
            warmed = {"chunks": source.warm(bar), "seconds": round(time.perf_counter() - started, 3)}
    if as_json:
        output.print_json({"model_dir": str(directory), "load_format": LOAD_FORMAT, "warmed": warmed})
        return
    if warmed is not None:
        typer.echo(f"checked and cached {warmed['chunks']} chunks in {warmed['seconds']:.2f} s", err=True)
    output.echo(str(directory))


def register(app: typer.Typer) -> None:
    app.command("model-dir")(model_dir)

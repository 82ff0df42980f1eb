"""`blockstore apply`: check a patch bundle completely, then move the ref to its target."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blockstore import patches
from blockstore.cli import output
from blockstore.cli.options import JsonOption, KeyOption, RefOption, StoreArgument
from blockstore.cli.output import escape_control
from blockstore.patches.bundle import read_key
from blockstore.repo import Repository


def apply_bundle(
    store: StoreArgument,
    bundle: Annotated[Path, typer.Argument(help="The .bsp bundle.")],
    ref: RefOption = "main",
    key: KeyOption = None,
    force_base: Annotated[
        bool, typer.Option(help="Apply even if the ref is not at the bundle's base.")
    ] = False,
    max_growth: Annotated[
        int,
        typer.Option(
            "--max-growth",
            help="Refuse a bundle whose new tensors exceed this many times (its size + the stored "
            "bytes they reuse).",
        ),
    ] = patches.DEFAULT_MAX_GROWTH,
    as_json: JsonOption = False,
) -> None:
    """Check a bundle completely, add its chunks, verify the target, then move the ref."""
    with Repository.open(store) as repo:
        result = patches.apply(
            repo,
            bundle,
            ref=ref,
            key=read_key(key) if key else None,
            force_base=force_base,
            max_growth=max_growth,
        )
    if output.report(result, as_json):
        return
    name = escape_control(result.ref)
    if result.old == result.new:
        output.echo(f"{name}: already at {output.short(result.new)}; nothing to do")
        return
    output.echo(
        f"{name}: {output.short(result.old)} -> {output.short(result.new)} "
        f"({result.chunks_added} chunks, {output.mib(result.bytes_added)} added)"
    )


def register(app: typer.Typer) -> None:
    app.command(name="apply")(apply_bundle)

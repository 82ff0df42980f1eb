"""`blockstore pack`: pack safetensors into the store as a new snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption
from blockstore.cli.output import escape_control, mib, mib_per_s
from blockstore.cli.progress import progress_bar
from blockstore.core.policy import TIERS, Policy, load_policy
from blockstore.ops.pack import AUTO_BASE, CODEC_CHOICES, DEFAULT_CODEC, PackResult
from blockstore.ops.pack import pack as pack_model
from blockstore.repo import Repository


def pack(
    inputs: Annotated[
        list[Path],
        typer.Argument(metavar="MODEL", help="safetensors file(s), shards, or a model directory."),
    ],
    store: Annotated[
        str, typer.Option("--store", "-s", help="The store (directory or s3:// URL) to pack into.")
    ],
    ref: Annotated[str, typer.Option(help="Ref to point at the new snapshot.")] = "main",
    message: Annotated[str, typer.Option("--message", "-m", help="Recorded with the snapshot.")] = "",
    codec: Annotated[str, typer.Option(help=f"One of: {', '.join(CODEC_CHOICES)}.")] = DEFAULT_CODEC,
    level: Annotated[int, typer.Option(help="zstd compression level.")] = 3,
    chunk_size: Annotated[
        int | None, typer.Option(help="Chunk size in bytes (default: the store's, set at init).")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="TOML policy: sides, tiers, rules, drift bounds.")
    ] = None,
    static: Annotated[
        list[str] | None, typer.Option("--static", help="Glob of tensors forced static (repeatable).")
    ] = None,
    dynamic: Annotated[
        list[str] | None, typer.Option("--dynamic", help="Glob of tensors forced dynamic (repeatable).")
    ] = None,
    static_tier: Annotated[
        str | None, typer.Option(help=f"Tier of static tensors: {', '.join(TIERS)}.")
    ] = None,
    base: Annotated[
        str,
        typer.Option(
            help="Store new chunks as deltas against this ref or snapshot id where that is smaller; "
            f"'{AUTO_BASE}': a snapshot at a ref with the same tensors; 'none': never."
        ),
    ] = AUTO_BASE,
    explain: Annotated[
        bool, typer.Option("--explain", help="Print each tensor's side, tier and why.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Pack a model into the store as a new snapshot (only chunks the store lacks are written)."""
    chosen = (load_policy(policy) if policy else Policy()).with_overrides(
        static or [], dynamic or [], static_tier
    )
    with Repository.open(store) as repo, progress_bar(not as_json) as bar:
        result = pack_model(
            repo,
            inputs,
            ref=ref,
            message=message,
            codec=codec,
            level=level,
            chunk_size=chunk_size,
            policy=chosen,
            progress=bar,
            base=None if base == "none" else base,
        )
    if output.report(result, as_json, result.to_json(explain=explain) if as_json else None):
        return
    if explain:
        for name, decision in result.decisions.items():
            output.echo(f"{decision.side:7} {decision.tier:8} {escape_control(name)}: {decision.reason}")
    _print_summary(result)


def _print_summary(result: PackResult) -> None:
    moved = f"{escape_control(result.ref or '')} -> {output.short(result.snapshot_id)}"
    state = "unchanged, ref not moved" if result.unchanged else moved
    output.echo(f"snapshot {result.snapshot_id.hex()} ({state})")
    output.echo(
        f"{result.tensors} tensors, {mib(result.raw_bytes)} raw, {mib(result.stored_bytes)} stored "
        f"(ratio {result.ratio:.4f})"
    )
    for key, group in result.groups.items():
        error = "" if group.worst_rel_error is None else f", worst relative error {group.worst_rel_error:.2e}"
        output.echo(
            f"  {key:17} {group.tensors:4} tensors {mib(group.raw_bytes):>11} -> "
            f"{mib(group.stored_bytes):>11} (ratio {group.ratio:.4f}{error})"
        )
    output.echo(
        f"{result.new_chunks} of {result.total_chunks} chunks new ({mib(result.new_bytes)} written) "
        f"in {result.seconds:.2f} s ({mib_per_s(result.raw_bytes, result.seconds)})"
    )
    if result.delta_base is not None:
        output.echo(
            f"{result.delta_chunks} new chunks stored as deltas against {output.short(result.delta_base)}"
        )


def register(app: typer.Typer) -> None:
    app.command()(pack)

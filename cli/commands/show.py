"""`blockstore show`: a snapshot's tensors as a table sized to the terminal."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption, split_spec
from blockstore.cli.output import escape_control, mib
from blockstore.core.manifests import TensorEntry
from blockstore.errors import TensorNotFound
from blockstore.ops.deltas import DeltaSummary, delta_summary
from blockstore.repo import Repository

_NUMERIC = ("chunks", "deltas", "ratio", "rel error")
_COLUMNS = ("name", "dtype", "shape", "side", "tier", "codec", *_NUMERIC)


def _row(e: TensorEntry, deltas: int) -> dict[str, Any]:
    return {
        "name": e.name,
        "dtype": e.dtype,
        "shape": list(e.shape),
        "side": e.side,
        "tier": e.tier,
        "codec": e.codec,
        "chunks": len(e.chunks),
        "delta_chunks": deltas,
        "raw_bytes": e.nbytes,
        "stored_bytes": e.stored_bytes,
        "ratio": round(e.stored_bytes / e.nbytes, 4) if e.nbytes else None,
        "digest": e.digest.hex(),
        "max_abs_error": e.error.max_abs if e.error else None,
        "rel_error": e.error.rel_frobenius if e.error else None,
    }


def _cells(row: dict[str, Any]) -> dict[str, str]:
    """A row as the table prints it, by column, escaped."""
    cells = {
        "name": row["name"],
        "dtype": row["dtype"],
        "shape": "x".join(map(str, row["shape"])) or "scalar",
        "side": row["side"],
        "tier": row["tier"],
        "codec": row["codec"],
        "chunks": str(row["chunks"]),
        "deltas": str(row["delta_chunks"]),
        "ratio": "-" if row["ratio"] is None else f"{row['ratio']:.3f}",
        "rel error": "-" if row["rel_error"] is None else f"{row['rel_error']:.2e}",
    }
    return {column: escape_control(cell) for column, cell in cells.items()}


def _columns(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """Every column, less those that would say nothing (no deltas, no lossy tensor): the table
    must fit the terminal."""
    empty = set()
    if not any(row["delta_chunks"] for row in rows):
        empty.add("deltas")
    if all(row["rel_error"] is None for row in rows):
        empty.add("rel error")
    return tuple(column for column in _COLUMNS if column not in empty)


def show(
    spec: Annotated[str, typer.Argument(metavar="STORE[@REF|@ID]")],
    tensor: Annotated[str | None, typer.Argument(help="Show only this tensor.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a snapshot's tensors: dtype, shape, side, tier, codec, chunks (and how many are stored
    as deltas), ratio, lossy error."""
    path, ref = split_spec(spec)
    with Repository.open(path, readonly=True) as repo:
        snapshot_id = repo.resolve(ref)
        snapshot = repo.snapshot(snapshot_id)
        deltas = delta_summary(repo, snapshot)
    entries = [snapshot.tensors[name] for f in snapshot.files for name in f.tensors]
    if tensor is not None:
        entries = [entry for entry in entries if entry.name == tensor]
        if not entries:
            raise TensorNotFound(tensor, output.short(snapshot_id))
    rows = [_row(entry, deltas.per_tensor.get(entry.name, 0)) for entry in entries]
    if as_json:
        output.print_json(
            {
                "snapshot": snapshot_id.hex(),
                "message": snapshot.message,
                "deltas": deltas.to_json(),
                "tensors": rows,
            }
        )
        return
    title = escape_control(f"snapshot {output.short(snapshot_id)} {snapshot.message}".strip())
    columns = _columns(rows)
    numeric = {columns.index(column) for column in _NUMERIC if column in columns}
    table = [tuple(cells[column] for column in columns) for cells in map(_cells, rows)]
    output.print_rows(title, columns, table, numeric)
    if deltas.delta_chunks:
        output.echo(describe_deltas(deltas))


def describe_deltas(deltas: DeltaSummary) -> str:
    """One line: how much is stored as deltas, and against which snapshots."""
    against = ", ".join(
        f"{count} in {output.short(snapshot_id) if snapshot_id else 'no snapshot (kept as bases)'}"
        for snapshot_id, count in deltas.bases.items()
    )
    return (
        f"{deltas.delta_chunks} of {deltas.chunks} chunks stored as deltas "
        f"({mib(deltas.delta_stored_bytes)} of {mib(deltas.stored_bytes)}); their base chunks: {against}"
    )


def register(app: typer.Typer) -> None:
    app.command()(show)

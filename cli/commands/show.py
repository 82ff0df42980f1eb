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


def _cells(row: dict[str, Any]) -> tuple[str, ...]:
    """A row as the table prints it, in `_COLUMNS` order, escaped."""
    cells = (
        row["name"],
        row["dtype"],
        "x".join(map(str, row["shape"])) or "scalar",
        row["side"],
        row["tier"],
        row["codec"],
        str(row["chunks"]),
        str(row["delta_chunks"]),
        "-" if row["ratio"] is None else f"{row['ratio']:.3f}",
        "-" if row["rel_error"] is None else f"{row['rel_error']:.2e}",
    )
    return tuple(escape_control(cell) for cell in cells)


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
    numeric = {_COLUMNS.index(column) for column in _NUMERIC}
    output.print_rows(title, _COLUMNS, [_cells(row) for row in rows], numeric)
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

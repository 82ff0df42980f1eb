"""`blockstore doctor`: readers, leases, reclaimable space and map usage."""

from __future__ import annotations

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption, StoreArgument
from blockstore.cli.output import escape_control, mib
from blockstore.ops.doctor import DoctorReport
from blockstore.ops.doctor import doctor as diagnose
from blockstore.repo import Repository


def doctor(store: StoreArgument, as_json: JsonOption = False) -> None:
    """Stale LMDB readers (cleared), leases, what gc would free, and map usage."""
    with Repository.open(store) as repo:
        report = diagnose(repo)
    if not output.report(report, as_json):
        _print_report(report)


def _print_report(report: DoctorReport) -> None:
    if report.map_size and report.map_used is not None:
        output.echo(
            f"map: {mib(report.map_used)} used of {mib(report.map_size)} mapped "
            f"({report.map_used / report.map_size:.0%}); data file {mib(report.file_bytes)}"
        )
        output.echo(
            f"readers: {report.reader_slots} of {report.max_readers} slots in use; "
            f"{report.stale_readers_cleared} stale slots of dead processes cleared"
        )
    else:  # an object store: no map, no reader slots
        output.echo(f"objects: {mib(report.file_bytes)} stored")
    for lease in report.leases:
        state = "stale: process gone, the next gc removes it" if lease.stale else "live"
        output.echo(
            f"lease: {escape_control(lease.role)}, pid {lease.pid} on {escape_control(lease.host)}, "
            f"{lease.age_s:.0f} s old ({state})"
        )
    if not report.leases:
        output.echo("leases: none")
    free = report.reclaimable
    output.echo(
        f"gc would free {len(free.deleted_snapshots)} snapshots and {free.deleted_chunks} chunks "
        f"({mib(free.freed_bytes)})"
    )


def register(app: typer.Typer) -> None:
    app.command()(doctor)

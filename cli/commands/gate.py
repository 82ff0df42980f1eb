"""`blockstore gate`: compare two evidence packs; exit 7 on a regression."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption
from blockstore.errors import Regression


def gate_command(
    baseline: Annotated[Path, typer.Argument(help="Baseline evidence pack.")],
    new: Annotated[Path, typer.Argument(help="New evidence pack.")],
    tolerance: Annotated[Path | None, typer.Option(help="TOML file: metric = relative tolerance.")] = None,
    allow_env_change: Annotated[bool, typer.Option(help="Compare packs from different machines.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Compare two packs metric by metric; exit 7 on any regression beyond its tolerance."""
    from blockstore.benchmarks.gate import gate, load_tolerances

    rows = gate(baseline, new, load_tolerances(tolerance), allow_env_change=allow_env_change)
    failed = [row for row in rows if not row.passed]
    if as_json:
        # GateRow lives in the benchmarks and has no to_json yet; these are its fields.
        rows_json = [{**asdict(row), "change": row.change} for row in rows]
        output.print_json({"passed": not failed, "rows": rows_json})
    else:
        for row in rows:
            verdict = "ok  " if row.passed else "FAIL"
            output.echo(
                f"{verdict} {row.method:11} {row.metric:24} {row.baseline:10.4g} -> {row.new:10.4g} "
                f"({row.change:+.1%}, tolerance {row.tolerance:.0%})"
            )
    if failed:
        worst = max(failed, key=lambda row: row.change)
        raise Regression(len(failed), f"{worst.method} {worst.metric} {worst.change:+.1%}")


def register(app: typer.Typer) -> None:
    app.command(name="gate")(gate_command)

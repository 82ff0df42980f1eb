"""`blockstore gate`: compare two evidence packs; exit 7 on a regression.

Improvements beyond tolerance are reported too, as a note to re-pin the baseline: a baseline kept
after the code got faster leaves the next regression room to hide in the old slack.
`--fail-on-improvement` turns them into a failure (exit 7), for a CI that insists on re-pinning.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption
from blockstore.errors import Improvement, Regression

if TYPE_CHECKING:
    from blockstore.benchmarks.gate import GateRow


def _verdict(row: GateRow) -> str:
    if not row.passed:
        return "FAIL"
    return "BETTER" if row.improved else "ok"


def _line(row: GateRow) -> str:
    kind = "deterministic, either way " if row.deterministic else ""
    return (
        f"{_verdict(row):6} {row.method:11} {row.metric:24} {row.baseline:10.4g} -> {row.new:10.4g} "
        f"({row.change:+.1%}, {kind}tolerance {row.tolerance:.0%})"
    )


def _named(row: GateRow) -> str:
    return f"{row.method} {row.metric} {row.change:+.1%}"


def gate_command(
    baseline: Annotated[Path, typer.Argument(help="Baseline evidence pack.")],
    new: Annotated[Path, typer.Argument(help="New evidence pack.")],
    tolerance: Annotated[Path | None, typer.Option(help="TOML file: metric = relative tolerance.")] = None,
    allow_env_change: Annotated[bool, typer.Option(help="Compare packs from different machines.")] = False,
    fail_on_improvement: Annotated[
        bool, typer.Option(help="Exit 7 when a metric improved beyond tolerance (re-pin first).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Compare two packs metric by metric; exit 7 on any regression beyond its tolerance (and
    deterministic counts that move either way); improvements are noted for re-pinning."""
    from blockstore.benchmarks.gate import gate, load_tolerances

    rows = gate(baseline, new, load_tolerances(tolerance), allow_env_change=allow_env_change)
    failed = [row for row in rows if not row.passed]
    improved = [row for row in rows if row.improved]
    if as_json:
        # GateRow lives in the benchmarks and has no to_json yet; these are its fields.
        rows_json = [{**asdict(row), "change": row.change} for row in rows]
        output.print_json({"passed": not failed, "improved": len(improved), "rows": rows_json})
    else:
        for row in rows:
            output.echo(_line(row))
    if failed:  # one error line; the improvements are in the rows above, and noted once this passes
        worst = max(failed, key=lambda row: abs(row.change))
        raise Regression(len(failed), _named(worst))
    if improved:
        best = max(improved, key=lambda row: abs(row.change))  # (a throughput improves upward)
        if fail_on_improvement:
            raise Improvement(len(improved), _named(best))
        output.note(
            f"{len(improved)} metric(s) improved beyond tolerance; re-pin the baseline to {new} "
            f"(best: {_named(best)})"
        )


def register(app: typer.Typer) -> None:
    app.command(name="gate")(gate_command)

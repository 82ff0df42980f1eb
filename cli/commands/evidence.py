"""`blockstore evidence verify`: re-check an evidence pack against its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption
from blockstore.errors import EvidenceDamaged


def evidence_verify(pack: Annotated[Path, typer.Argument()], as_json: JsonOption = False) -> None:
    """Re-check every file of a pack against its manifest; exit 4 naming what was altered."""
    from blockstore.benchmarks.evidence import verify_pack

    problems = verify_pack(pack)
    if as_json:
        output.print_json({"pack": str(pack), "intact": not problems, "problems": problems})
    else:
        for problem in problems:
            output.echo(output.escape_control(f"damaged: {problem}"))
    if problems:
        raise EvidenceDamaged(pack, len(problems))
    if not as_json:
        output.echo(f"intact: {pack}")


def register(app: typer.Typer) -> None:
    evidence_app = typer.Typer(help="Check evidence packs.", no_args_is_help=True, rich_markup_mode=None)
    evidence_app.command(name="verify")(evidence_verify)
    app.add_typer(evidence_app, name="evidence")

"""`blockstore verify`: check a store or one snapshot; a damaged one exits 4."""

from __future__ import annotations

from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption, split_spec
from blockstore.cli.output import escape_control
from blockstore.cli.progress import progress_bar
from blockstore.errors import DamageFound
from blockstore.ops.verify import VerifyReport
from blockstore.ops.verify import verify as verify_store
from blockstore.repo import Repository


def verify(
    spec: Annotated[str, typer.Argument(metavar="STORE[@REF|@ID]", help="A whole store, or one snapshot.")],
    deep: Annotated[
        bool, typer.Option("--deep", help="Also decode every chunk and re-hash every tensor.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Check refs, snapshots and chunk presence (--deep: re-decode and re-hash everything);
    exit 0 when clean, 4 with one line per damaged tensor."""
    path, ref = split_spec(spec)
    with Repository.open(path, readonly=True) as repo, progress_bar(not as_json and deep) as bar:
        report = verify_store(repo, ref, deep=deep, progress=bar)
    if not output.report(report, as_json):
        _print_report(report)
    if not report.clean:
        raise DamageFound(len(report.damages), path)


def _print_report(report: VerifyReport) -> None:
    for damage in report.damages:
        output.echo(escape_control(damage.line()))
    for key in report.orphans:
        output.echo(f"orphan: chunk {key} is referenced by no snapshot (harmless; gc removes it)")
    verdict = "clean" if report.clean else f"{len(report.damages)} damaged"
    decoded = f"{output.mib(report.bytes_checked)} decoded and hashed"
    checked = decoded if report.deep else "present (not decoded)"
    output.echo(
        f"{verdict}: {report.snapshots} snapshots, {report.tensors} tensors, {report.chunks} chunks "
        f"{checked}, {len(report.orphans)} orphan chunks"
    )


def register(app: typer.Typer) -> None:
    app.command()(verify)

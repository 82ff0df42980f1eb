"""The typer app behind the `blockstore` command: global options, the command modules, and the one
place errors become exit codes.

Every command prints either a human summary or, with `--json`, one JSON object on stdout. Every
user mistake or damaged store ends in a single `blockstore: error: ...` line on stderr and the
error's own exit code, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from blockstore.cli import output
from blockstore.cli.commands import (
    apply,
    bench,
    diff,
    doctor,
    drift,
    evidence,
    export,
    gate,
    gc,
    init,
    log,
    ls,
    model_dir,
    pack,
    rollback,
    show,
    stats,
    tag,
    transfer,
    verify,
)
from blockstore.errors import EXIT_ERROR, EXIT_INTERRUPTED, BlockstoreError
from blockstore.storage.cache import CACHE_ENV

COMMANDS = (
    *(init, pack, export, ls, show, stats, verify),
    *(diff, apply, rollback, log, tag, gc, doctor),
    *(transfer, model_dir, drift, bench, gate, evidence),
)
"""Each module's `register(app)` adds its command(s), in the order `blockstore --help` lists them."""


class Commands(TyperGroup):
    """The top-level group. Every command runs inside its `invoke` (from the console script and
    from typer's test runner alike), so the one handler that turns an error into a line on stderr
    and an exit code lives here."""

    def invoke(self, ctx: Any) -> Any:  # a typer Context (typer ships its own copy of click)
        try:
            return super().invoke(ctx)
        except BlockstoreError as exc:
            output.error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # a path the user named: unreadable, missing, a directory, full disk
            where = f"{exc.filename}: " if exc.filename else ""
            output.error(f"{where}{exc.strerror or exc}")
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("blockstore: interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    name="blockstore",
    cls=Commands,
    help="A versioned, content-addressed model store: pack, export, verify, diff, apply, rollback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: it wraps to the terminal and shows a flag as a flag (`--json`), where the
    # rich layout labels every option with a type (`--json <bool>`).
    rich_markup_mode=None,
)


@app.callback()
def _options(
    endpoint_url: Annotated[
        str | None,
        typer.Option("--endpoint-url", help="S3 endpoint for s3:// stores (default: AWS_ENDPOINT_URL)."),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="Local read-through cache directory for s3:// stores (or BLOCKSTORE_CACHE)."),
    ] = None,
) -> None:
    """Options for every command; they travel as the environment variables they stand for, so the
    runtime and subcommands see the same settings whichever way they were given."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url
    if cache:
        os.environ[CACHE_ENV] = str(cache)


for _module in COMMANDS:
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="blockstore")
    finally:
        output.flush()  # a reader gone before the last flush is not an error either


if __name__ == "__main__":
    main()

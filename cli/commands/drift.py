"""`blockstore check-drift`: run the packed model beside the original; exit 6 past the bounds."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from blockstore.cli import output
from blockstore.cli.options import JsonOption, split_spec
from blockstore.core.policy import load_policy
from blockstore.errors import DriftExceeded


def check_drift_command(
    spec: Annotated[str, typer.Argument(metavar="STORE[@REF|@ID]", help="Packed model to check.")],
    reference: Annotated[
        Path, typer.Option(help="The original weights: a safetensors file or model directory.")
    ],
    model_config: Annotated[
        Path | None, typer.Option(help="config.json (default: the one packed with the model).")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer directory: real prompts and a perplexity text.")
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="TOML policy whose [drift] bounds apply.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Run the packed model and the original on fixed inputs; exit 6 when drift exceeds the bounds."""
    from blockstore.runtime.drift import check_drift  # torch and transformers only when used

    path, ref = split_spec(spec)
    report = check_drift(
        path,
        ref or "main",
        reference=reference,
        config=model_config,
        tokenizer=tokenizer,
        policy=load_policy(policy) if policy else None,
    )
    if as_json:
        # DriftReport lives in the runtime and has no to_json yet; these are its fields.
        output.print_json({**asdict(report), "passed": report.passed})
    else:
        output.echo(f"{report.kind} at tier {report.tier} (loosest tier in the snapshot)")
        for name, value in report.metrics.items():
            output.echo(f"  {name:16} {value:.6g}")
        output.echo("bounds: " + ", ".join(f"{name} {limit:.10g}" for name, limit in report.bounds.items()))
    if not report.passed:
        raise DriftExceeded(spec, report.tier, "; ".join(report.failures))
    if not as_json:
        output.echo("drift within bounds")


def register(app: typer.Typer) -> None:
    app.command(name="check-drift")(check_drift_command)

"""Arguments and options that several commands share, and the STORE@REF syntax."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blockstore.errors import InvalidArgument

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
StoreArgument = Annotated[
    str, typer.Argument(metavar="STORE", help="A store directory, or an object store s3://BUCKET/PREFIX.")
]
KeyOption = Annotated[Path | None, typer.Option("--key", help="Key file for the bundle's MAC.")]
RefOption = Annotated[str, typer.Option("--ref", help="The ref to move.")]


def split_spec(spec: str) -> tuple[str, str | None]:
    """`STORE@REF` → (store location, ref or id); a bare location selects the default ref."""
    if "@" in spec and not Path(spec).exists():
        path, _, ref = spec.rpartition("@")
        if not path or not ref:
            raise InvalidArgument(f"{spec!r}: expected STORE or STORE@REF")
        return path, ref
    return spec, None

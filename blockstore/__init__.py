"""blockstore: a versioned, content-addressed model store for LLM inference.

Pack safetensors models into a store of compressed, deduplicated chunks; export them back byte for
byte; ship an update as a patch of only the chunks that changed; load a model lazily, its weights
decoded when first used::

    import blockstore

    with blockstore.init("store") as repo:
        blockstore.pack(repo, "model/")                 # a model directory or .safetensors files
        blockstore.export(repo, "main", "out/")
        assert blockstore.verify(repo, deep=True).clean

    model = blockstore.runtime.load_model("store")      # torch / transformers, weights on demand
    blockstore.runtime.close(model)                     # or: with blockstore.runtime.closing(model):

The names here are the public front (`__all__`); they are imported on first use, so
`import blockstore` stays cheap and does not import torch until `blockstore.runtime` is named.
The modules underneath (`blockstore.repo`, `blockstore.ops`, `blockstore.patches`, ...) hold the
full interfaces.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BlockstoreError",
    "Repository",
    "__version__",
    "apply",
    "diff",
    "export",
    "init",
    "open",
    "pack",
    "rollback",
    "runtime",
    "verify",
]

_FUNCTIONS = ["apply", "diff", "export", "init", "open", "pack", "rollback", "verify"]
_FROM = {
    "BlockstoreError": "blockstore.errors",
    "Repository": "blockstore.repo",
    **dict.fromkeys(_FUNCTIONS, "blockstore.api"),
}
"""Front name → the module that defines it."""
_SUBPACKAGES = {"runtime", "patches"}
"""Installed from their own folders; named here so `blockstore.runtime` works without an import."""

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time `__getattr__` imports on demand
    from blockstore import runtime
    from blockstore.api import apply, diff, export, init, open, pack, rollback, verify
    from blockstore.errors import BlockstoreError
    from blockstore.repo import Repository


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"blockstore.{name}")
    if name in _FROM:
        value = getattr(importlib.import_module(_FROM[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'blockstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBPACKAGES})

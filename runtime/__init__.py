"""Lazy materialization and torch integration (docs/design.md §6).

`open(store, ref)` gives a read-only Mapping of lazy tensors; `load_model(store, ref, ...)` gives a
working torch/transformers module whose weights are decoded when its forward first touches them.
"""

from blockstore.sizes import parse_size

from .cache import RuntimeStats
from .lazy import LazyStateDict, LazyTensor, open
from .modules import LazyWeight, eager_model, load_model

__all__ = [
    "LazyStateDict",
    "LazyTensor",
    "LazyWeight",
    "RuntimeStats",
    "eager_model",
    "load_model",
    "open",
    "parse_size",
]

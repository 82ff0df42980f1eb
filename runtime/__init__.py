"""Lazy materialization and torch integration: weights stay in the store until they are used.

`open(store, ref)` gives a read-only Mapping of lazy tensors (a context manager); `load_model(store,
ref, ...)` gives a working torch/transformers module whose weights are decoded when its forward
first touches them. Both pin their snapshot against `gc` until `close()` — `state.close()`,
`close(model)`, or the end of `with open(...)` / `with closing(load_model(...))` — and release the
pin on their own when garbage collected or when the process exits.
"""

from blockstore.sizes import parse_size

from .cache import RuntimeStats
from .lazy import LazyStateDict, LazyTensor, open
from .modules import LazyWeight, close, closing, eager_model, load_model, state_of

__all__ = [
    "LazyStateDict",
    "LazyTensor",
    "LazyWeight",
    "RuntimeStats",
    "close",
    "closing",
    "eager_model",
    "load_model",
    "open",
    "parse_size",
    "state_of",
]

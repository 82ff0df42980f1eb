"""Read a lazily loaded model's tensors ahead of its forward, in the order the forward uses them.

From an object store a lazy model's first forward waited on one round trip per tensor, module by
module: the link sat idle while each layer computed, and a first token took longer than streaming
the whole file. `Readahead` walks the tensors in forward order (`forward_order`: embeddings,
layer 0, layer 1, ..., the head) from the moment the store is opened, while the model is still
being built, in groups of about `GROUP_BYTES`, with `DEPTH` groups in flight so the link never
waits for a group's slowest chunk.
The forward finds its tensors decoded or being decoded (the tensor cache's single-flight loading
makes it wait for the group that holds a tensor instead of fetching it again), and one that the
readahead has not reached yet it fetches itself.

It is for a model without a memory budget: everything it reads stays resident anyway, as after
the first forward. A failed read is no error here: the forward's own access decodes again and
reports it, naming the tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import suppress
from typing import TYPE_CHECKING

from blockstore.core.manifests import TensorEntry

from .prefetch import layer_of

if TYPE_CHECKING:
    from .lazy import LazyStateDict

GROUP_BYTES = 32 << 20
"""Raw bytes a group holds, about: several layers of a small model, one of a large model's."""
DEPTH = 3
"""Groups decoded at once: one finishing, one in full flight, one starting."""


_ATTENTION = ("attn.", "attention.")
"""A layer's attention block (`self_attn.q_proj`, `attention.self.query`; not the norm named
`post_attention_layernorm`, which comes after it)."""


def forward_order(names: Iterable[str]) -> list[str]:
    """Tensor names in the order a transformer's forward first uses them, from the names alone (so
    reading can start before the model is built): tensors outside any layer stack that come first
    (embeddings), then each stack's layers by index, attention before the rest of a layer, then
    everything else (the final norm, the head). safetensors files sort their keys as text, which
    puts layer 10 before layer 2 and the head before the embeddings."""

    def rank(position: int, name: str) -> tuple[int, str, int, int, int]:
        layer = layer_of(name)
        if layer is None:
            return (0 if "embed" in name else 2, "", 0, 0, position)
        stack, index = layer
        rest = name[len(stack) + len(str(index)) + 2 :]
        return (1, stack, index, 0 if any(part in rest for part in _ATTENTION) else 1, position)

    ordered = sorted(enumerate(names), key=lambda item: rank(*item))
    return [name for _, name in ordered]


def groups_of(entries: Sequence[TensorEntry], limit: int = GROUP_BYTES) -> list[list[TensorEntry]]:
    """`entries` cut in order into groups of at most `limit` raw bytes (a larger tensor alone)."""
    groups: list[list[TensorEntry]] = []
    size = limit
    for entry in entries:
        if size + entry.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


class Readahead:
    """Materializes `entries`, in order, on background threads of its own until done or closed."""

    def __init__(self, state: LazyStateDict, entries: Sequence[TensorEntry]) -> None:
        self._state = state
        self._executor = ThreadPoolExecutor(DEPTH, "blockstore-readahead")
        self._pending: list[Future[None]] = [
            self._executor.submit(self._load, group) for group in groups_of(entries)
        ]

    def _load(self, group: list[TensorEntry]) -> None:
        with suppress(Exception):
            self._state.materialize_many(group, prefetch=True)

    def wait(self) -> None:
        """Block until every group has been read (for measurements and tests)."""
        wait(self._pending)

    def close(self) -> None:
        """Stop: groups not started are dropped, the ones being read finish."""
        self._executor.shutdown(wait=True, cancel_futures=True)

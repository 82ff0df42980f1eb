"""Background prefetch of the next layers' static tensors.

Transformer weights are named by layer (`model.layers.3.mlp.up_proj.weight`,
`encoder.layer.3.intermediate.dense.weight`): the first `.<number>.` in a name gives its stack and
layer. When a tensor of layer i is touched, the static tensors of layers i+1..i+N of the same stack
are decoded from one background thread, each layer as one batch on the decode threads, so their
decode overlaps layer i's compute.
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from concurrent.futures import Future, wait
from contextlib import suppress
from typing import TYPE_CHECKING

from blockstore.core.policy import STATIC

from .threads import ProcessLocalPool

if TYPE_CHECKING:
    from .lazy import LazyStateDict

_LAYER = re.compile(r"^(.*?)\.(\d+)\.")
Layer = tuple[str, int]


def layer_of(name: str) -> Layer | None:
    """(stack prefix, layer index) of a tensor name, or None for a tensor outside any stack."""
    match = _LAYER.match(name)
    return (match.group(1), int(match.group(2))) if match else None


class LayerPrefetcher:
    """Schedules decodes of the layers after the one just touched; each layer at most once in flight."""

    def __init__(self, state: LazyStateDict, depth: int) -> None:
        self._state = state
        self._depth = depth
        self._layers: dict[Layer, list[str]] = defaultdict(list)
        for name, entry in state.snapshot.tensors.items():
            layer = layer_of(name)
            if layer is not None and entry.side == STATIC:
                self._layers[layer].append(name)
        self._queued: set[Layer] = set()
        self._lock = threading.Lock()
        self._worker = ProcessLocalPool(1, "blockstore-prefetch")
        self._pending: list[Future[None]] = []

    def touched(self, name: str) -> None:
        """Called on every materialization request (not on prefetches themselves)."""
        layer = layer_of(name)
        if layer is None:
            return
        stack, index = layer
        for ahead in range(index + 1, index + 1 + self._depth):
            target = (stack, ahead)
            if target not in self._layers:
                break
            if all(self._state.is_materialized(name) for name in self._layers[target]):
                continue
            with self._lock:
                if target in self._queued:
                    continue
                self._queued.add(target)
            self._pending.append(self._worker.executor.submit(self._load, target))

    def _load(self, layer: Layer) -> None:
        try:
            # A failed prefetch is no error here: the real access decodes again and reports it.
            with suppress(Exception):
                tensors = self._state.snapshot.tensors
                self._state.materialize_many([tensors[name] for name in self._layers[layer]], prefetch=True)
        finally:
            with self._lock:
                self._queued.discard(layer)

    def wait(self) -> None:
        """Block until every prefetch scheduled so far has finished."""
        with self._lock:
            pending, self._pending = self._pending, []
        wait(pending)

    def close(self) -> None:
        self._worker.shutdown(cancel_futures=True)

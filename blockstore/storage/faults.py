"""Named crash points, so tests can kill a write at every step the write-ordering rules rely on.

Every store write transaction passes two points, `<step>.before-commit` (inside the transaction:
dying there must lose the whole transaction) and `<step>.committed` (just after it). The steps are
`lease`, `chunks`, `snapshot`, `ref`, `unlease` and `gc`; pack, apply, rollback and gc are sequences
of them. Setting `BLOCKSTORE_CRASH_AT=<point>[@<n>]` makes the process `os._exit(CRASH_EXIT_CODE)` the
`n`th time (default: first) it passes `<point>` — no cleanup, no `finally`, like a kill -9.
Unset (the normal case), a crash point costs one environment lookup per transaction.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

CRASH_ENV = "BLOCKSTORE_CRASH_AT"
CRASH_EXIT_CODE = 97
WRITE_STEPS = ("lease", "chunks", "snapshot", "ref", "unlease", "gc")
CRASH_POINTS = tuple(f"{step}.{when}" for step in WRITE_STEPS for when in ("before-commit", "committed"))

_passes: Counter[str] = Counter()
_lock = threading.Lock()


def crash_point(point: str) -> None:
    """Die here, without cleanup, if `BLOCKSTORE_CRASH_AT` names this point and pass."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != point:
        return
    with _lock:
        _passes[point] += 1
        reached = _passes[point] == int(nth or 1)
    if reached:
        os._exit(CRASH_EXIT_CODE)

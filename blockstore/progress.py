"""How long operations report progress without knowing who listens (a terminal bar, or nobody)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives a task's size once, then increments; the CLI renders it, library callers may not."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, amount: int, item: str = "") -> None:
        """`amount` more bytes done; `item` names what they belong to (a tensor), if anything."""


class Silent:
    """The default listener: library calls and `--json` runs print nothing."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int, item: str = "") -> None:
        pass

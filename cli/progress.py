"""Progress bars on a terminal, nothing otherwise (pipes, CI logs and --json stay clean)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from blockstore.progress import Progress as ProgressListener
from blockstore.progress import Silent


class _RichBar:
    """Adapts blockstore's progress protocol to one rich task."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def start(self, description: str, total: int) -> None:
        self._task = self._progress.add_task(description, total=total)

    def advance(self, amount: int, item: str = "") -> None:
        if self._task is not None:
            self._progress.advance(self._task, amount)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[ProgressListener]:
    """A listener that draws on stderr when `enabled` and stderr is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield Silent()
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        yield _RichBar(progress)

"""Progress bars on a terminal, nothing otherwise (pipes, CI logs and --json stay clean).

The bar names the tensor being worked on and shows a percentage; sizes and the rate are in MiB,
the units of every summary the CLI prints after it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from blockstore.cli.output import MIB, escape_control
from blockstore.progress import Progress as ProgressListener
from blockstore.progress import Silent

ITEM_WIDTH = 32
"""Columns kept for the tensor name; a longer name is cut with an ellipsis."""


class _MibPerSecond(ProgressColumn):
    """The transfer rate in MiB/s (rich's own speed column counts decimal MB)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{speed / MIB:,.1f} MiB/s", style="progress.data.speed")


class _RichBar:
    """Adapts blockstore's progress protocol to one rich task."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None
        self._item = ""

    def start(self, description: str, total: int) -> None:
        self._task = self._progress.add_task(description, total=total, item="")

    def advance(self, amount: int, item: str = "") -> None:
        if self._task is None:
            return
        if item and item != self._item:  # a new tensor: redraw now, so its name shows at once
            self._item = item
            self._progress.update(self._task, advance=amount, item=escape_control(item), refresh=True)
        else:
            self._progress.advance(self._task, amount)


def columns() -> tuple[ProgressColumn, ...]:
    return (
        TextColumn("{task.description}"),
        TextColumn(
            "{task.fields[item]}",
            markup=False,
            table_column=Column(width=ITEM_WIDTH, no_wrap=True, overflow="ellipsis"),
        ),
        BarColumn(bar_width=None),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        _MibPerSecond(),
        TimeRemainingColumn(),
    )


@contextmanager
def progress_bar(enabled: bool, *, console: Console | None = None) -> Iterator[ProgressListener]:
    """A listener that draws on stderr when `enabled` and stderr is a terminal (or on `console`)."""
    if not enabled or (console is None and not sys.stderr.isatty()):
        yield Silent()
        return
    with Progress(*columns(), console=console or Console(stderr=True), transient=True) as progress:
        yield _RichBar(progress)

"""Thread pools that survive fork(): a forked child has none of its parent's threads, and an
executor that believes it still has workers hangs on its first submit."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor


class ProcessLocalPool:
    """A ThreadPoolExecutor started on first use, and started afresh in a forked child."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._pid = -1
        self._executor: ThreadPoolExecutor | None = None

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None or self._pid != os.getpid():
            self._executor = ThreadPoolExecutor(self._workers, self._name)
            self._pid = os.getpid()
        return self._executor

    def shutdown(self, *, cancel_futures: bool = False) -> None:
        """Stop this process's workers (a parent's executor, inherited by fork, is just dropped)."""
        if self._executor is not None and self._pid == os.getpid():
            self._executor.shutdown(wait=True, cancel_futures=cancel_futures)
        self._executor = None

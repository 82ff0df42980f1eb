"""Thread pools that survive fork(), and work shared between a pool and the thread that asks.

A forked child has none of its parent's threads, and an executor that believes it still has
workers hangs on its first submit: `ProcessLocalPool` starts afresh in a child. `run_shared` hands
a batch of jobs to the pool's threads and the calling thread together.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

_Job = TypeVar("_Job")


class ProcessLocalPool:
    """A ThreadPoolExecutor started on first use, and started afresh in a forked child."""

    def __init__(self, workers: int, name: str) -> None:
        self.workers = workers
        self._name = name
        self._pid = -1
        self._executor: ThreadPoolExecutor | None = None

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None or self._pid != os.getpid():
            self._executor = ThreadPoolExecutor(self.workers, self._name)
            self._pid = os.getpid()
        return self._executor

    def shutdown(self, *, cancel_futures: bool = False) -> None:
        """Stop this process's workers (a parent's executor, inherited by fork, is just dropped)."""
        if self._executor is not None and self._pid == os.getpid():
            self._executor.shutdown(wait=True, cancel_futures=cancel_futures)
        self._executor = None


class _SharedJobs:
    """Jobs, longest first, handed out one at a time: helpers take from the long end, the caller
    from the short end. Short jobs are mostly Python (they hold the GIL) and long ones mostly
    compiled code that releases it, so each side's work overlaps the other's instead of two
    threads queueing for the GIL over the short ones at the end. The first failure stops the
    hand-out; the batch is done when the hand-out has stopped and no job is still running."""

    def __init__(self, jobs: Sequence[_Job], work: Callable[[_Job], None]) -> None:
        self._jobs = deque(jobs)
        self._work = work
        self._lock = threading.Lock()
        self._stopped = False
        self._running = 0
        self.done = threading.Event()
        self.error: BaseException | None = None

    def take_part(self, *, shortest_first: bool = False) -> None:
        take = self._jobs.pop if shortest_first else self._jobs.popleft
        while True:
            with self._lock:
                if self._stopped or not self._jobs:
                    self._stopped = True
                    if self._running == 0:
                        self.done.set()
                    return
                job = take()
                self._running += 1
            try:
                self._work(job)
            except BaseException as exc:
                with self._lock:
                    self.error = self.error or exc
                    self._stopped = True
            finally:
                with self._lock:
                    self._running -= 1


def run_shared(pool: ProcessLocalPool, jobs: Sequence[_Job], work: Callable[[_Job], None]) -> None:
    """`work(job)` for every job, on the pool's threads and the calling thread together; raises the
    first job's exception once no job is running any more.

    The caller works instead of waiting, so `pool.workers` threads run in all (one more would only
    contend for the cores), and a call made from a busy pool thread cannot deadlock: a helper that
    starts after the jobs ran out returns at once. Pass the jobs longest first."""
    shared = _SharedJobs(jobs, work)
    for _ in range(min(pool.workers, len(jobs)) - 1):
        pool.executor.submit(shared.take_part)
    shared.take_part(shortest_first=True)
    shared.done.wait()
    if shared.error is not None:
        raise shared.error

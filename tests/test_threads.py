"""Work shared between the decode threads and the caller (`run_shared`), and batched cache loads."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from blockstore.runtime.cache import RuntimeStats, TensorCache
from blockstore.runtime.threads import ProcessLocalPool, run_shared


@pytest.fixture
def pool():
    shared = ProcessLocalPool(2, "test-shared")
    yield shared
    shared.shutdown()


def test_every_job_runs_once_on_the_pool_and_the_caller(pool) -> None:
    ran: list[tuple[int, str]] = []
    lock = threading.Lock()

    def work(job: int) -> None:
        time.sleep(0.005)  # 200 ms in all: time enough for the helper to start and take some
        with lock:
            ran.append((job, threading.current_thread().name))

    run_shared(pool, list(range(40)), work)
    assert sorted(job for job, _ in ran) == list(range(40))
    names = {name for _, name in ran}
    assert threading.current_thread().name in names and any(n.startswith("test-shared") for n in names)


def test_the_caller_takes_the_short_end(pool) -> None:
    """Helpers take the longest jobs first, the caller the shortest: the job list comes sorted."""
    taken_by_caller: list[int] = []
    release = threading.Event()

    def work(job: int) -> None:
        if threading.current_thread() is threading.main_thread():
            taken_by_caller.append(job)
            if len(taken_by_caller) == 3:
                release.set()
        else:
            release.wait(5)

    run_shared(pool, [5, 4, 3, 2, 1, 0], work)
    assert taken_by_caller[:3] == [0, 1, 2]


def test_a_call_from_a_busy_pool_thread_cannot_deadlock(pool) -> None:
    """Both workers run a job that itself shares work: the helpers those calls submit can only
    start once a worker is free, so each caller must finish its own jobs alone, not wait for them."""
    both_busy = threading.Barrier(2, timeout=5)

    def share() -> int:
        both_busy.wait()
        done: list[int] = []
        run_shared(pool, list(range(5)), done.append)
        return len(done)

    futures = [pool.executor.submit(share) for _ in range(2)]
    assert [future.result(timeout=10) for future in futures] == [5, 5]


def test_the_first_failure_is_raised_after_running_jobs_end_and_stops_the_hand_out(pool) -> None:
    started: list[int] = []
    finished: list[int] = []

    def work(job: int) -> None:
        started.append(job)
        if job == 0:
            raise KeyError("job 0")
        time.sleep(0.02)
        finished.append(job)

    with pytest.raises(KeyError, match="job 0"):
        run_shared(pool, [*range(100, 0, -1), 0], work)  # the caller takes 0 first
    assert len(started) < 101  # the hand-out stopped
    assert sorted(finished) == sorted(job for job in started if job)  # nothing still running


def test_no_jobs_returns_at_once(pool) -> None:
    run_shared(pool, [], lambda job: None)


def test_a_batch_waits_for_a_key_another_thread_is_loading() -> None:
    cache = TensorCache(None, RuntimeStats())
    loading, release = threading.Event(), threading.Event()

    def slow() -> torch.Tensor:
        loading.set()
        release.wait(5)
        return torch.ones(2)

    other = threading.Thread(target=lambda: cache.get_or_load("a", slow, evictable=True))
    other.start()
    loading.wait(5)
    asked: list[list[int]] = []

    def load_many(positions: list[int]) -> list[torch.Tensor]:
        asked.append(positions)
        release.set()
        return [torch.zeros(3) for _ in positions]

    a, b, again = cache.get_or_load_many([("a", True), ("b", True), ("b", True)], load_many)
    other.join(5)
    assert asked == [[1]]  # 'a' was the other thread's to load, the second 'b' the same load
    assert a.tolist() == [1, 1] and b.tolist() == [0, 0, 0] and again is b
    assert (cache.stats.misses, cache.stats.hits) == (2, 2)


def test_a_failed_batch_leaves_nothing_cached_or_pending() -> None:
    cache = TensorCache(None, RuntimeStats())

    def fail(positions: list[int]) -> list[torch.Tensor]:
        raise OSError("disk")

    with pytest.raises(OSError, match="disk"):
        cache.get_or_load_many([("a", True), ("b", False)], fail)
    assert "a" not in cache and "b" not in cache
    assert cache.get_or_load("a", lambda: torch.ones(1), evictable=True).tolist() == [1]

"""Stream a snapshot's tensors one by one, under a cap on the host memory they hold.

A serving engine loads weights by pulling `(name, tensor)` pairs and copying each into its own
parameter (vLLM's `model.load_weights(iterator)`), so the whole model never needs to sit in host
memory twice. `stream_tensors` feeds such a loop: it keeps fetching and decoding the next tensors on
its threads while the engine copies the current one, and stops reading ahead when the decoded
bytes it holds would pass `memory_limit` (Run:ai Model Streamer's `memory_limit` is the model).

What the cap counts: every decoded tensor from the moment its buffer is allocated until the engine
has moved on from it. A tensor handed out is released two steps later, because the engine's loop
variable still holds it while it asks for the next one. A tensor that does not fit under the cap
is read alone, beside at most the one the engine may still hold, so the bound is the larger of the
cap and twice the largest tensor (`StreamReport.peak_held_bytes` tells what it was). Stored values
in flight (at most `concurrency` compressed chunks) come on top.

Every chunk is checked as it is decoded (`Repository.decode_chunk_into`), so damage raises
`TensorCorrupt` naming the tensor, the snapshot and the chunk before a wrong byte reaches the engine.
Lossless tensors arrive bit-exact at their stored dtype; tensors stored at a lossy tier (int8, fp8,
int4) are decoded, which dequantizes them to their original dtype, and cast to `lossy_dtype` when
one is given (the engine's dtype).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from blockstore.codecs import LOSSLESS
from blockstore.core.manifests import Snapshot, SnapshotId, TensorEntry
from blockstore.errors import InvalidArgument, UnsupportedInput
from blockstore.repo import Repository

from .lazy import TORCH_DTYPES


@dataclass
class StreamReport:
    """What a stream delivered: counts, bytes, time, and the most decoded bytes it held at once."""

    tensors: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    seconds: float = 0.0
    memory_limit: int = 0
    peak_held_bytes: int = 0
    largest_tensor: int = 0
    dequantized: dict[str, int] = field(default_factory=dict)
    """Tensors per lossy tier that were dequantized on the way in."""

    def to_json(self) -> dict[str, object]:
        return {
            "tensors": self.tensors,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "seconds": round(self.seconds, 4),
            "memory_limit": self.memory_limit,
            "peak_held_bytes": self.peak_held_bytes,
            "largest_tensor": self.largest_tensor,
            "dequantized": dict(self.dequantized),
        }


def snapshot_order(snapshot: Snapshot) -> list[TensorEntry]:
    """The snapshot's tensors in the order of its files and, within a file, of their data: the
    order a safetensors loader would give, and the one that reads each packed file front to back."""
    return [snapshot.tensors[name] for source in snapshot.files for name in source.tensors]


@dataclass
class _Pending:
    entry: TensorEntry
    buffer: torch.Tensor
    parts: list[Future[int]]


class _Budget:
    """Decoded bytes held by one stream; only the stream's own thread touches it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0

    def fits(self, nbytes: int) -> bool:
        return self.held + nbytes <= self.limit

    def take(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def give_back(self, nbytes: int) -> None:
        self.held -= nbytes


def stream_tensors(
    repo: Repository,
    snapshot_id: SnapshotId,
    entries: Sequence[TensorEntry],
    *,
    memory_limit: int,
    concurrency: int,
    lossy_dtype: torch.dtype | None = None,
    report: StreamReport | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each of `entries`, in order, on the CPU, decoded ahead on `concurrency`
    threads while the caller consumes, holding at most `memory_limit` decoded bytes (see the module
    docstring for what that counts). `report`, when given, is filled in as the stream goes."""
    if memory_limit <= 0:
        raise InvalidArgument(f"memory limit {memory_limit} must be a positive number of bytes")
    if concurrency <= 0:
        raise InvalidArgument(f"concurrency {concurrency} must be a positive number of threads")
    for entry in entries:
        if entry.dtype not in TORCH_DTYPES:
            raise UnsupportedInput(entry.name, f"dtype {entry.dtype} has no torch equivalent here")
    report = report if report is not None else StreamReport()
    report.memory_limit = memory_limit
    return _stream(repo, snapshot_id, list(entries), memory_limit, concurrency, lossy_dtype, report)


def _stream(
    repo: Repository,
    snapshot_id: SnapshotId,
    entries: list[TensorEntry],
    memory_limit: int,
    concurrency: int,
    lossy_dtype: torch.dtype | None,
    report: StreamReport,
) -> Iterator[tuple[str, torch.Tensor]]:
    started = time.perf_counter()
    budget = _Budget(memory_limit)
    upcoming = deque(entries)
    pending: deque[_Pending] = deque()
    handed_out: deque[int] = deque()  # sizes of tensors the caller may still hold
    pool = ThreadPoolExecutor(concurrency, "blockstore-stream")

    def read_ahead() -> None:
        while upcoming and (budget.fits(upcoming[0].nbytes) or not pending):
            entry = upcoming.popleft()
            budget.take(entry.nbytes)
            pending.append(_start(pool, repo, snapshot_id, entry))

    try:
        while upcoming or pending:
            read_ahead()
            head = pending.popleft()
            for part in head.parts:
                report.stored_bytes += part.result()
            tensor = head.buffer.view(TORCH_DTYPES[head.entry.dtype]).reshape(head.entry.shape)
            name, nbytes = head.entry.name, head.entry.nbytes
            held = nbytes  # what the budget counts for this tensor until the caller moves past it
            if head.entry.tier != LOSSLESS:
                report.dequantized[head.entry.tier] = report.dequantized.get(head.entry.tier, 0) + 1
                if lossy_dtype is not None and tensor.dtype != lossy_dtype:
                    tensor = tensor.to(lossy_dtype)
                    grown = tensor.nbytes - nbytes  # a wider engine dtype: the cast holds more
                    if grown > 0:
                        budget.take(grown)
                        held += grown
            del head
            report.tensors += 1
            report.raw_bytes += nbytes
            report.largest_tensor = max(report.largest_tensor, nbytes)
            report.peak_held_bytes = max(report.peak_held_bytes, budget.peak)
            report.seconds = time.perf_counter() - started
            yield name, tensor
            del tensor
            handed_out.append(held)
            if len(handed_out) > 1:  # the caller has rebound its loop variable by now
                budget.give_back(handed_out.popleft())
        report.seconds = time.perf_counter() - started
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start(
    pool: ThreadPoolExecutor, repo: Repository, snapshot_id: SnapshotId, entry: TensorEntry
) -> _Pending:
    """Allocate `entry`'s buffer and queue the decode of each of its chunks into its slice."""
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = buffer.numpy().data
    offsets = [0, *accumulate(chunk.raw_len for chunk in entry.chunks)]
    parts = [
        pool.submit(
            repo.decode_chunk_into, snapshot_id, entry, index, view[offsets[index] : offsets[index + 1]]
        )
        for index in range(len(entry.chunks))
    ]
    return _Pending(entry, buffer, parts)

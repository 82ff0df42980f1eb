"""What every serving engine's loader shares: options, the model directory, and a weight source.

An engine starts from a model *directory*: it reads config.json, generation_config.json and the
tokenizer from it before any weight is loaded (vLLM does so in the front process, long before its
loader runs). A store keeps those files in each snapshot (`pack` takes them from beside the
weights), so `write_model_dir` writes them out, with no weight file, into a directory of their own
and adds `blockstore.json`, which names the store and the exact snapshot. Pointing the engine at
that directory with the blockstore load format is then enough: the loader finds the store in the
marker, and the config the engine was built from is the one of the snapshot it loads.

`ServeOptions` are the loader's options (vLLM: `--model-loader-extra-config`); they override the
marker. `WeightSource` opens the store, pins the snapshot for the span of the load, checks that it
fits the engine, streams its tensors under the memory cap (`blockstore.runtime.stream`) and can
warm an object store's local read-through cache before a start.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blockstore.core.hashing import digest
from blockstore.core.source import INDEX_NAME
from blockstore.errors import EnvironmentFailure, InvalidArgument, ModelMismatch, RefNotFound
from blockstore.files import ENVIRONMENT_CAUSES, fsync_directory
from blockstore.progress import Progress, Silent
from blockstore.repo import DEFAULT_REF, Repository
from blockstore.sizes import parse_size
from blockstore.storage import is_url
from blockstore.storage.base import short_id
from blockstore.storage.cache import WRITE_BEHIND_BYTES, ReadThroughCache

from ..stream import StreamReport, snapshot_order, stream_tensors

LOAD_FORMAT = "blockstore"
MARKER = "blockstore.json"
MARKER_FORMAT = 1
DEFAULT_MEMORY_LIMIT = 1 << 30
"""Decoded bytes a load may hold ahead of the engine's copy: enough to keep the threads busy on a
fast link, small next to any model worth streaming; a tensor larger than this is read alone."""
LOCAL_CONCURRENCY = min(8, os.cpu_count() or 1)
"""Decode threads for a local store: the work is decoding, so one per core."""
OPTION_KEYS = ("store", "ref", "cache_dir", "concurrency", "memory_limit")
WEIGHT_INDEXES = (INDEX_NAME,)
"""Packed side files that describe weight files; a model directory holds no weights, so none."""


def default_models_root() -> Path:
    """Where `write_model_dir` puts model directories unless told: the user's cache."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "blockstore" / "models"


@dataclass(frozen=True)
class ServeOptions:
    """Where the weights are and how to read them. `store` and `ref` default to the model
    directory's marker; `memory_limit` caps decoded bytes held ahead of the engine's copy."""

    store: str | None = None
    ref: str | None = None
    cache_dir: str | None = None
    concurrency: int | None = None
    memory_limit: int = DEFAULT_MEMORY_LIMIT

    @classmethod
    def parse(cls, extra: Mapping[str, Any] | None) -> ServeOptions:
        """Options from an engine's free-form dict, each checked; unknown keys are refused."""
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(OPTION_KEYS))
        if unknown:
            raise InvalidArgument(
                f"load format {LOAD_FORMAT}: unknown option(s) {', '.join(unknown)} "
                f"(accepted: {', '.join(OPTION_KEYS)})"
            )
        for key in ("store", "ref", "cache_dir"):
            if extra.get(key) is not None and not isinstance(extra[key], str):
                raise InvalidArgument(
                    f"load format {LOAD_FORMAT}: {key} must be a string, got {extra[key]!r}"
                )
        concurrency = extra.get("concurrency")
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency <= 0
        ):
            raise InvalidArgument(
                f"load format {LOAD_FORMAT}: concurrency must be a positive integer, got {concurrency!r}"
            )
        limit = extra.get("memory_limit", DEFAULT_MEMORY_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int | str):
            raise InvalidArgument(f"load format {LOAD_FORMAT}: memory_limit must be a size, got {limit!r}")
        memory_limit = parse_size(limit, "memory_limit") or 0
        if memory_limit <= 0:
            raise InvalidArgument(f"load format {LOAD_FORMAT}: memory_limit must be positive, got {limit!r}")
        return cls(extra.get("store"), extra.get("ref"), extra.get("cache_dir"), concurrency, memory_limit)


@dataclass(frozen=True)
class Marker:
    """`blockstore.json` of a model directory: the store, the snapshot its files came from, the ref
    it was resolved from, and the read-through cache to use for an object store."""

    store: str
    snapshot: str
    ref: str | None = None
    cache_dir: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "format": MARKER_FORMAT,
            "store": self.store,
            "snapshot": self.snapshot,
            "ref": self.ref,
            "cache_dir": self.cache_dir,
        }

    @classmethod
    def read(cls, directory: Path) -> Marker | None:
        """The marker of `directory`, None when it has none; a malformed one is refused."""
        path = directory / MARKER
        if not path.is_file():
            return None
        try:
            found = json.loads(path.read_bytes())
            if found.get("format") != MARKER_FORMAT:
                raise ValueError(f"format {found.get('format')!r}, expected {MARKER_FORMAT}")
            marker = cls(found["store"], found["snapshot"], found.get("ref"), found.get("cache_dir"))
            if not all(isinstance(v, str) for v in (marker.store, marker.snapshot)):
                raise ValueError("store and snapshot must be strings")
            if not all(v is None or isinstance(v, str) for v in (marker.ref, marker.cache_dir)):
                raise ValueError("ref and cache_dir must be strings or null")
            if len(marker.snapshot) != 64 or any(c not in "0123456789abcdef" for c in marker.snapshot):
                raise ValueError("snapshot must be a full snapshot id (64 lowercase hex digits)")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgument(f"{path}: not a blockstore model marker ({exc})") from None
        return marker


def _location(store: str) -> str:
    """A store location that means the same from any working directory."""
    return store if is_url(store) else str(Path(store).resolve())


def write_model_dir(
    store: str, ref: str | None = None, output: Path | None = None, *, cache_dir: str | None = None
) -> Path:
    """Write snapshot `ref`'s side files (config, generation config, tokenizer) and the marker into
    a directory an engine can be started from; returns it. The default directory is keyed by the
    snapshot id under the user's cache, and one already complete is reused. The directory appears
    whole or not at all (written beside it, then renamed)."""
    with Repository.open_for_reading(store, cache=cache_dir) as repo:
        snapshot_id = repo.resolve(ref)
        snapshot = repo.snapshot(snapshot_id)
    if "config.json" not in snapshot.extras:
        raise InvalidArgument(
            f"snapshot {short_id(snapshot_id)} of {store} has no config.json: pack the model directory "
            "(or a weights file with config.json beside it) so an engine can be built from it"
        )
    marker = Marker(
        _location(store), snapshot_id.hex(), ref or DEFAULT_REF, cache_dir and str(Path(cache_dir).resolve())
    )
    files = {name: blob for name, blob in snapshot.extras.items() if name not in WEIGHT_INDEXES}
    files[MARKER] = _marker_bytes(marker)
    # The default directory is named by everything it holds (the snapshot and the marker), so two
    # stores holding one snapshot, or one store read through two caches, never share one.
    target = output or default_models_root() / f"{snapshot_id.hex()}-{digest(files[MARKER]).hex()[:12]}"
    if target.exists():
        if _holds(target, files):
            return target
        if any(target.iterdir()):
            raise InvalidArgument(
                f"{target}: exists and is not a model directory of snapshot {short_id(snapshot_id)}"
            )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            for name, blob in files.items():
                with open(staging / name, "wb") as handle:
                    handle.write(blob)
                    handle.flush()
                    os.fsync(handle.fileno())
            fsync_directory(staging)
            try:
                if output is not None and target.exists():  # an empty directory the user named
                    target.rmdir()
                os.replace(staging, target)
            except OSError as exc:  # another process (a second worker on this host) got there first
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _holds(target, files):
                    raise
                shutil.rmtree(staging, ignore_errors=True)
                return target
            fsync_directory(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_CAUSES:
            raise
        raise EnvironmentFailure(target, f"cannot write it: {ENVIRONMENT_CAUSES[exc.errno]}") from None
    return target


def _marker_bytes(marker: Marker) -> bytes:
    return json.dumps(marker.to_json(), indent=2).encode() + b"\n"


def _json_or_bytes(blob: bytes) -> object:
    """A JSON file's value (so formatting differences do not count), or its bytes if it is not JSON."""
    try:
        return json.loads(blob)
    except ValueError:
        return blob


def _holds(directory: Path, files: Mapping[str, bytes]) -> bool:
    """Whether `directory` holds exactly `files` (a complete model directory of that snapshot)."""
    try:
        if sorted(path.name for path in directory.iterdir()) != sorted(files):
            return False
        return all((directory / name).read_bytes() == blob for name, blob in files.items())
    except OSError:
        return False


class WeightSource:
    """One load: the store opened, the snapshot pinned against gc until `close()`."""

    def __init__(self, options: ServeOptions, model_dir: Path | None) -> None:
        marker = Marker.read(model_dir) if model_dir is not None and model_dir.is_dir() else None
        store = options.store or (marker.store if marker else None)
        if store is None:
            where = f"{model_dir} has no {MARKER}" if model_dir is not None else "no model directory"
            raise InvalidArgument(
                f"load format {LOAD_FORMAT} needs a store: {where}; write one with `blockstore model-dir "
                "STORE[@REF]` or pass the option store (vLLM: --model-loader-extra-config '{\"store\": ...}')"
            )
        cache = options.cache_dir or (marker.cache_dir if marker and store == marker.store else None)
        self.location = store
        self.repo = Repository.open_for_reading(store, cache=cache)
        self._lease: bytes | None = None
        try:
            if options.ref is None and marker is not None and store == marker.store:
                spec = marker.snapshot  # the snapshot the directory's config came from, not a ref moved since
            else:
                spec = options.ref or DEFAULT_REF
            try:
                self.snapshot_id, self._lease = self.repo.pin(spec)
            except RefNotFound:
                raise RefNotFound(spec, store) from None
            self.snapshot = self.repo.snapshot(self.snapshot_id)
            if model_dir is not None:
                self._check_config(model_dir)
        except BaseException:
            self.close()
            raise
        self.concurrency = options.concurrency or (
            self.repo.store.capabilities.concurrency if is_url(store) else LOCAL_CONCURRENCY
        )
        self.memory_limit = options.memory_limit
        if isinstance(self.repo.store, ReadThroughCache):
            # Fetched values waiting for the cache are host memory too: a quarter of the cap is
            # theirs, so the stream's decoded tensors and the cache's writes together stay under it.
            share = min(WRITE_BEHIND_BYTES, self.memory_limit // 4)
            self.repo.store.bound_pending(share)
            self.memory_limit -= share

    @property
    def label(self) -> str:
        """`store@snapshot` for messages."""
        return f"{self.location}@{short_id(self.snapshot_id)}"

    def _check_config(self, model_dir: Path) -> None:
        """The engine was built from `model_dir`'s config.json: refuse weights packed with another."""
        try:
            used = (model_dir / "config.json").read_bytes()
        except OSError:
            return  # a model named by hub id or built elsewhere: shapes are checked as tensors arrive
        packed = self.snapshot.extras.get("config.json")
        if packed is not None and _json_or_bytes(packed) != _json_or_bytes(used):
            raise ModelMismatch(
                self.location,
                short_id(self.snapshot_id),
                f"its config.json differs from {model_dir / 'config.json'} the engine was built from "
                "(write the model directory again: blockstore model-dir)",
            )

    def mismatch(self, detail: str) -> ModelMismatch:
        return ModelMismatch(self.location, short_id(self.snapshot_id), detail)

    def tensors(
        self, *, lossy_dtype: torch.dtype | None = None, report: StreamReport | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the snapshot, streamed under the memory cap (see `stream_tensors`)."""
        return stream_tensors(
            self.repo,
            self.snapshot_id,
            snapshot_order(self.snapshot),
            memory_limit=self.memory_limit,
            concurrency=self.concurrency,
            lossy_dtype=lossy_dtype,
            report=report,
        )

    def warm(self, progress: Progress | None = None) -> int:
        """Read every chunk of the snapshot once, checked, so an object store's read-through cache
        holds them all (a fleet host's restart then reads nothing remote); returns the chunk count.
        A store without a cache is only checked. `progress` hears the raw bytes done per tensor."""
        progress = progress or Silent()
        owners = {
            chunk.key: (entry, chunk) for entry in self.snapshot.tensors.values() for chunk in entry.chunks
        }
        progress.start("warming", sum(chunk.raw_len for _, chunk in owners.values()))
        count = 0
        pairs = list(owners.values())
        for (entry, chunk), _ in zip(pairs, self.repo.checked_values(self.snapshot_id, pairs), strict=True):
            progress.advance(chunk.raw_len, entry.name)
            count += 1
        return count

    def close(self) -> None:
        """Unpin the snapshot and close the store; closing twice is harmless."""
        lease, self._lease = self._lease, None
        try:
            self.repo.unpin(lease)
        finally:
            self.repo.close()

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

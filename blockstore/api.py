"""The public front: one call per thing a user does with a store, each a few lines over the modules
that do the work (`blockstore.repo`, `blockstore.ops`, `blockstore.patches`).

Every function takes either an open `Repository` (kept open: the caller owns it) or a store location
(a directory as `str` or `Path`, or an `s3://bucket/prefix` URL), which it opens for the span of the
call and closes again. Paths may be `str` or `Path` throughout. Results are the operations' own
result objects; each has `to_json()`.

Packing and patches are imported by the calls that use them, and the lazy runtime (which needs
torch) is `blockstore.runtime`, imported only when first named: a program that only exports or
verifies loads none of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from blockstore.core.chunks import DEFAULT_CHUNK_SIZE
from blockstore.ops.export import export as _export
from blockstore.ops.verify import verify as _verify
from blockstore.repo import DEFAULT_REF, Repository
from blockstore.sizes import parse_size
from blockstore.storage import is_url

if TYPE_CHECKING:
    from blockstore.core.policy import Policy
    from blockstore.ops.export import ExportResult
    from blockstore.ops.pack import PackResult
    from blockstore.ops.verify import VerifyReport
    from blockstore.patches.apply import ApplyResult
    from blockstore.patches.diff import DiffResult
    from blockstore.patches.rollback import RollbackResult
    from blockstore.progress import Progress

__all__ = ["apply", "diff", "export", "init", "open", "pack", "rollback", "verify"]

PathLike = str | os.PathLike[str]
"""A file or directory: `str` or `pathlib.Path`."""
Location = str | os.PathLike[str]
"""Where a store lives: a directory (`str` or `Path`) or an object store URL `s3://bucket/prefix`."""
RepoOrLocation = Repository | Location


def _location(location: Location) -> str | Path:
    """`s3://` URLs stay strings (they are not paths); everything else becomes a Path."""
    return location if is_url(location) else Path(location)


@contextmanager
def _repository(repo: RepoOrLocation, *, reading: bool = False) -> Iterator[Repository]:
    """`repo` itself when it is a Repository (the caller closes it), else the store at that location,
    opened for this call only. `reading` opens it writable when it can be, so the read can pin its
    snapshot against a concurrent gc, and read-only otherwise."""
    if isinstance(repo, Repository):
        yield repo
        return
    location = _location(repo)
    opened = Repository.open_for_reading(location) if reading else Repository.open(location)
    with opened:
        yield opened


def _spec(spec: str | bytes | None) -> str | None:
    """A ref name, an id prefix, or a snapshot id as bytes (as results carry them) → what `resolve` takes."""
    return spec.hex() if isinstance(spec, bytes) else spec


def _version(version: str | bytes | os.PathLike[str]) -> str:
    """A diff side: a ref, an id prefix, a snapshot id as bytes, or a model's path."""
    return version.hex() if isinstance(version, bytes) else os.fspath(version)


def _key(key: bytes | PathLike | None) -> bytes | None:
    """A bundle MAC key: bytes as given, or the path of a key file (hashed as the CLI's --key is)."""
    if key is None or isinstance(key, bytes):
        return key
    from blockstore.patches.bundle import read_key

    return read_key(Path(key))


def open(location: Location, *, readonly: bool = False, cache: Location | None = None) -> Repository:
    """Open the store at `location` and return its `Repository`.

    `location` is a store directory (`str` or `Path`) or an object store URL `s3://bucket/prefix`.
    `readonly=True` opens it without write access (nothing it reads can be pinned against `gc`).
    `cache` names a local directory that caches an object store's chunks (ignored for a directory
    store). The repository is a context manager: `with blockstore.open("store") as repo: ...`
    closes it at the end of the block; otherwise call `repo.close()`.
    """
    return Repository.open(_location(location), readonly=readonly, cache=_location(cache) if cache else None)


def init(location: Location, *, chunk_size: int | str = DEFAULT_CHUNK_SIZE) -> Repository:
    """Create an empty store at `location` and return it open.

    `chunk_size` (bytes, or a size such as "1MiB") is fixed for the store's life: every later pack
    cuts tensors at the same boundaries, which is what lets one version's chunks dedup against the
    next's. Refuses a location that already holds something.
    """
    size = parse_size(chunk_size, "chunk_size")
    assert size is not None
    return Repository.init(_location(location), chunk_size=size)


def pack(
    repo: RepoOrLocation,
    inputs: PathLike | Iterable[PathLike],
    *,
    ref: str | None = DEFAULT_REF,
    message: str = "",
    codec: str | None = None,
    level: int = 3,
    chunk_size: int | None = None,
    workers: int | None = None,
    policy: Policy | None = None,
    progress: Progress | None = None,
    base: str | None = "auto",
) -> PackResult:
    """Pack safetensors files, or a model directory, into the store and point `ref` at the result.

    `inputs` is one path or several. A model directory's `config.json` and tokenizer files are
    kept beside the weights. Chunks the store already holds (an earlier version's unchanged
    tensors) are not stored again. `ref=None` stores the snapshot without moving any ref.
    `policy` (`blockstore.core.policy.Policy`) decides each tensor's side and tier, e.g.
    `Policy(static_tier="int8")` to store embedding tables as int8; the default keeps everything
    lossless. `codec` and `level` choose the lossless codec; `chunk_size` defaults to the store's.
    `base` is the snapshot (ref or id) new chunks may be stored as deltas against where that is
    smaller — a fine-tune then costs a fraction of the model; `"auto"` picks a snapshot at a ref
    holding the same tensors, None never uses one. Returns a `PackResult` (`snapshot_id`, sizes,
    `ratio`, `to_json()`).
    """
    from blockstore.ops.pack import DEFAULT_CODEC
    from blockstore.ops.pack import pack as _pack

    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(path) for path in inputs]
    with _repository(repo) as opened:
        return _pack(
            opened,
            paths,
            ref=ref,
            message=message,
            codec=codec or DEFAULT_CODEC,
            level=level,
            chunk_size=chunk_size,
            workers=workers,
            policy=policy,
            progress=progress,
            base=base,
        )


def export(
    repo: RepoOrLocation, spec: str | bytes | None, out: PathLike, *, progress: Progress | None = None
) -> ExportResult:
    """Write the snapshot `spec` names back out as safetensors files, byte for byte as packed.

    `spec` is a ref ("main", a tag), a snapshot id prefix, or a snapshot id; None means "main".
    A one-file snapshot is written to `out` itself unless `out` is a directory or ends with "/"
    (then it goes into that directory with the config/tokenizer files packed beside it); a sharded
    one is always written into directory `out`. The snapshot is
    pinned while it is read, so a concurrent `gc` cannot delete it half way; every chunk and tensor
    is checked on the way out.
    """
    target = Path(out)
    if os.fspath(out).endswith(("/", os.sep)):  # Path() drops the slash that asks for a directory
        target.mkdir(parents=True, exist_ok=True)
    with _repository(repo, reading=True) as opened, opened.reading(_spec(spec)) as snapshot_id:
        return _export(opened, snapshot_id, target, progress=progress)


def verify(
    repo: RepoOrLocation,
    spec: str | bytes | None = None,
    *,
    deep: bool = False,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check the store: one snapshot (`spec`: a ref or id prefix) or, with `spec=None`, every
    snapshot, every ref, and chunks no snapshot uses.

    The default checks that every snapshot hashes to its id and every chunk it names is present;
    `deep=True` also decodes every chunk and hashes every tensor. Returns a `VerifyReport`: `clean`
    is True when nothing is damaged; `damages` lists what is, one entry per damaged thing.
    """
    with _repository(repo, reading=True) as opened:
        return _verify(opened, _spec(spec), deep=deep, progress=progress)


def diff(
    repo: RepoOrLocation,
    old: str | bytes | os.PathLike[str],
    new: str | bytes | os.PathLike[str],
    out: PathLike,
    *,
    key: bytes | PathLike | None = None,
    deltas: bool = True,
) -> DiffResult:
    """Write a patch bundle to `out` that upgrades a store holding `old` to `new`.

    `old` and `new` are refs or id prefixes of this store, or paths of models (a .safetensors file
    or a model directory), which are packed into the store first, without moving any ref. The
    bundle holds only the chunks `new` has and `old` lacks. `key` (bytes, or the path of a key
    file) adds a MAC that `apply` checks with the same key. Changed chunks ship as deltas against
    `old`'s where that is smaller; `deltas=False` ships whole chunks only (a bundle that
    blockstore versions before delta chunks can apply).
    """
    from blockstore.patches.diff import diff as _diff

    with _repository(repo, reading=True) as opened:
        return _diff(opened, _version(old), _version(new), Path(out), key=_key(key), deltas=deltas)


def apply(
    repo: RepoOrLocation,
    bundle: PathLike,
    *,
    ref: str = DEFAULT_REF,
    key: bytes | PathLike | None = None,
    force_base: bool = False,
    max_growth: int | None = None,
) -> ApplyResult:
    """Apply the patch bundle at `bundle` to `ref`: every shipped chunk and the target snapshot are
    checked first, and `ref` moves only when all of it is in, so a failed apply changes nothing
    readable. `ref` must point at the bundle's base version unless `force_base` (the base's tensors
    must then still match). Applying a bundle twice is a no-op. `key` as for `diff`. A bundle whose
    new tensors exceed `max_growth` (default 64) times its size plus the stored bytes they reuse
    is refused before anything is decoded; raise it for a trusted, highly repetitive bundle.
    """
    from blockstore.patches.apply import DEFAULT_MAX_GROWTH
    from blockstore.patches.apply import apply as _apply

    growth = DEFAULT_MAX_GROWTH if max_growth is None else max_growth
    with _repository(repo) as opened:
        return _apply(opened, Path(bundle), ref=ref, key=_key(key), force_base=force_base, max_growth=growth)


def rollback(
    repo: RepoOrLocation, *, ref: str = DEFAULT_REF, to: str | bytes | None = None, steps: int = 1
) -> RollbackResult:
    """Point `ref` back at an earlier version: `to` (a ref or id prefix), or `steps` versions back
    along the ref's history. Nothing is deleted; the move is recorded in the ref's log, so it can
    be undone with another rollback.
    """
    from blockstore.patches.rollback import rollback as _rollback

    with _repository(repo) as opened:
        return _rollback(opened, ref=ref, to=_spec(to), steps=steps)

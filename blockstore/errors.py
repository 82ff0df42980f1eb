"""One exception hierarchy for everything a user can get wrong or a store can suffer.

Each class carries its own message template and exit code (borg's habit), so the CLI needs a single
`except BlockstoreError` that prints one line and exits with `exit_code`, never a traceback.
Exit codes: 2 bad input or usage, 3 something named does not exist, 4 damaged data,
5 a concurrent writer got there first, 6 a packed model drifts beyond its bounds, 7 a benchmark
regressed past the gate.
"""

from __future__ import annotations

from typing import ClassVar


class BlockstoreError(Exception):
    """Base class: a user-facing, one-line error with an exit code."""

    exit_code: ClassVar[int] = 2
    template: ClassVar[str] = "{}"

    def __init__(self, *args: object) -> None:
        super().__init__(self.template.format(*args))


class InvalidSafetensors(BlockstoreError):
    template = "{}: not a valid safetensors file: {}"


class UnsupportedInput(BlockstoreError):
    template = "{}: {}"


class InvalidArgument(BlockstoreError):
    template = "{}"


class StoreNotFound(BlockstoreError):
    exit_code = 3
    template = "no blockstore at {} (create one with `blockstore init {}`)"


class StoreExists(BlockstoreError):
    template = "{} already exists; refusing to initialise over it"


class StoreFormatMismatch(BlockstoreError):
    template = "store {} has format {!r}; this blockstore reads {}"


class RefNotFound(BlockstoreError):
    exit_code = 3
    template = "ref {!r} does not exist in store {}"


class SnapshotNotFound(BlockstoreError):
    exit_code = 3
    template = "snapshot {} does not exist in store {}"


class AmbiguousSnapshotId(BlockstoreError):
    template = "snapshot id prefix {!r} matches {} snapshots in store {}; give more digits"


class TensorNotFound(BlockstoreError):
    exit_code = 3
    template = "tensor {!r} is not in snapshot {}"


class ChunkMissing(BlockstoreError):
    exit_code = 4
    template = "chunk {} is missing from the store"


class ChunkCorrupt(BlockstoreError):
    exit_code = 4
    template = "chunk {} is corrupt: {}"


class TensorCorrupt(BlockstoreError):
    exit_code = 4
    template = "tensor {!r} of snapshot {} is damaged: {}"


class StoreCorrupt(BlockstoreError):
    exit_code = 4
    template = "store {} is damaged: {}"


class RefConflict(BlockstoreError):
    exit_code = 5
    template = "ref {!r} moved from {} to {} while this operation ran; nothing was published"


class WriterActive(BlockstoreError):
    exit_code = 5
    template = "store {} is in use ({}); gc deleted nothing, run it again later"


class ObjectStoreFailed(BlockstoreError):
    """A request to an object store failed (network, credentials, server error)."""

    template = "object store {}: {} {} failed: {}"


class ObjectStoreDenied(ObjectStoreFailed):
    """The credentials may not do this (read-only credentials opening a store to write, say)."""


class ObjectStoreNotConfigured(BlockstoreError):
    """No credentials (or no endpoint) for an object store: what to set, not what failed."""

    template = "object store {}: {}"


class ConditionalWritesIgnored(BlockstoreError):
    """An object store that accepted a create-only put over an existing object, or a put with a
    stale If-Match: compare-and-set on refs cannot work there."""

    template = (
        "object store {} ignores conditional writes (If-None-Match / If-Match), so refs cannot be "
        "moved safely there; use a server that honours them (S3, MinIO, SeaweedFS, moto)"
    )


class BundleRejected(BlockstoreError):
    exit_code = 4
    template = "{}: bundle rejected: {}"


class WrongBase(BlockstoreError):
    template = (
        "bundle {} applies to snapshot {}, but ref {!r} is at {} (use --force-base if that base is present)"
    )


class DriftExceeded(BlockstoreError):
    """A packed model drifts from its original beyond the policy's bounds (`check-drift`)."""

    exit_code = 6
    template = "drift of {} beyond the {} bounds: {}"


class EvidenceDamaged(BlockstoreError):
    """An evidence pack whose files no longer match its manifest."""

    exit_code = 4
    template = "evidence pack {} is damaged: {} problem(s)"


class Regression(BlockstoreError):
    """`gate` found a metric worse than the baseline beyond its tolerance."""

    exit_code = 7
    template = "{} metric(s) regressed beyond tolerance; worst: {}"


class EnvironmentFailure(BlockstoreError):
    """Exit 8: the machine refused an operation on a path (no space left, no permission, a read-only
    filesystem, an I/O error, a lock file pulled from under a writer). Nothing says the data is
    damaged (that is exit 4); the same command can succeed once the cause in the message is fixed."""

    exit_code = 8
    template = "{}: {}"

"""One exception hierarchy for everything a user can get wrong or a store can suffer.

Each class carries its own message template and exit code (borg's habit), so the CLI needs a single
`except BlockstoreError` that prints one line and exits with `exit_code`, never a traceback.
The exit codes are the named constants below; scripts can tell "not there" from "damaged" from
"someone else was writing" without parsing the message.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_ERROR = 2
"""Bad input or usage: a file that is not safetensors, an invalid name or option."""
EXIT_NOT_FOUND = 3
"""Something named does not exist: a store, a ref, a snapshot, a tensor."""
EXIT_DAMAGED = 4
"""Damaged data: a chunk, a snapshot, a bundle or an evidence pack fails its checks."""
EXIT_CONFLICT = 5
"""A concurrent writer got there first (a ref moved, the store was in use)."""
EXIT_DRIFT = 6
"""A packed model drifts from its original beyond the policy's bounds."""
EXIT_REGRESSION = 7
"""A benchmark regressed past the gate's tolerance."""
EXIT_ENVIRONMENT = 8
"""The machine refused (no space, a read-only store or filesystem, no permission); data is fine."""
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C (128 + SIGINT, the shell's convention)."""


class BlockstoreError(Exception):
    """Base class: a user-facing, one-line error with an exit code."""

    exit_code: ClassVar[int] = EXIT_ERROR
    template: ClassVar[str] = "{}"

    def __init__(self, *args: object) -> None:
        super().__init__(self.template.format(*args))


class InvalidSafetensors(BlockstoreError):
    template = "{}: not a valid safetensors file: {}"


class SourceChanged(BlockstoreError):
    template = (
        "{}: the file changed while it was packed ({}); nothing was published: pack it again once it "
        "is complete"
    )


class UnsupportedInput(BlockstoreError):
    template = "{}: {}"


class InvalidArgument(BlockstoreError):
    template = "{}"


class StoreNotFound(BlockstoreError):
    exit_code = EXIT_NOT_FOUND
    template = "no blockstore at {} (create one with `blockstore init {}`)"


class StoreExists(BlockstoreError):
    template = "{} already exists; refusing to initialise over it"


class StoreFormatMismatch(BlockstoreError):
    template = "store {} has format {!r}; this blockstore reads {}"


class RefNotFound(BlockstoreError):
    exit_code = EXIT_NOT_FOUND
    template = "ref {!r} does not exist in store {}"


class SnapshotNotFound(BlockstoreError):
    exit_code = EXIT_NOT_FOUND
    template = "snapshot {} does not exist in store {}"


class AmbiguousSnapshotId(BlockstoreError):
    template = "snapshot id prefix {!r} matches {} snapshots in store {}; give more digits"


class TensorNotFound(BlockstoreError):
    exit_code = EXIT_NOT_FOUND
    template = "tensor {!r} is not in snapshot {}"


class ChunkMissing(BlockstoreError):
    exit_code = EXIT_DAMAGED
    template = "chunk {} is missing from the store"


class ChunkCorrupt(BlockstoreError):
    exit_code = EXIT_DAMAGED
    template = "chunk {} is corrupt: {}"


class ChunkCollision(BlockstoreError):
    """Two different chunks share an xxh3 key: the store (or this pack) holds other bytes under the
    key a tensor's chunk has, so the chunk cannot be stored or deduplicated."""

    exit_code = EXIT_DAMAGED
    template = (
        "tensor {!r}: chunk {} collision: {} holds other bytes under this xxh3 key "
        "(BLAKE3 {}, wanted {}); nothing was published"
    )


class TensorCorrupt(BlockstoreError):
    exit_code = EXIT_DAMAGED
    template = "tensor {!r} of snapshot {} is damaged: {}"


class StoreCorrupt(BlockstoreError):
    exit_code = EXIT_DAMAGED
    template = "store {} is damaged: {}"


class DamageFound(BlockstoreError):
    """`verify` found damage; the report (printed before this) names each damaged thing."""

    exit_code = EXIT_DAMAGED
    template = "verify found {} damaged item(s) in store {}"


class RefConflict(BlockstoreError):
    exit_code = EXIT_CONFLICT
    template = "ref {!r} moved from {} to {} while this operation ran; nothing was published"


class WriterActive(BlockstoreError):
    exit_code = EXIT_CONFLICT
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
    exit_code = EXIT_DAMAGED
    template = "{}: bundle rejected: {}"


class WrongBase(BlockstoreError):
    template = (
        "bundle {} applies to snapshot {}, but ref {!r} is at {} (use --force-base if that base is present)"
    )


class DriftExceeded(BlockstoreError):
    """A packed model drifts from its original beyond the policy's bounds (`check-drift`)."""

    exit_code = EXIT_DRIFT
    template = "drift of {} beyond the {} bounds: {}"


class EvidenceDamaged(BlockstoreError):
    """An evidence pack whose files no longer match its manifest."""

    exit_code = EXIT_DAMAGED
    template = "evidence pack {} is damaged: {} problem(s)"


class Regression(BlockstoreError):
    """`gate` found a metric worse than the baseline beyond its tolerance."""

    exit_code = EXIT_REGRESSION
    template = "{} metric(s) regressed beyond tolerance; worst: {}"


class Improvement(BlockstoreError):
    """`gate --fail-on-improvement` found metrics better than the baseline beyond tolerance: the
    baseline must be re-pinned, or the next regression hides in the old slack."""

    exit_code = EXIT_REGRESSION
    template = "{} metric(s) improved beyond tolerance; re-pin the baseline to the new pack (best: {})"


class ModelMismatch(BlockstoreError):
    """A serving engine's model cannot take the snapshot's tensors (names, shapes, a config)."""

    template = "store {} snapshot {} does not fit the model: {}"


class EnvironmentFailure(BlockstoreError):
    """Exit 8: the machine refused an operation on a path (no space left, no permission, a read-only
    filesystem, an I/O error, a lock file pulled from under a writer). Nothing says the data is
    damaged (that is exit 4); the same command can succeed once the cause in the message is fixed."""

    exit_code = EXIT_ENVIRONMENT
    template = "{}: {}"

"""Snapshots (manifests) and tensor entries: immutable values, serialized canonically.

A snapshot lists every tensor (its chunks, digest, side, codec), keeps each source file's header
verbatim so `export` rebuilds the files byte for byte, keeps small side files (config.json, the
shard index) verbatim, and names its parent. Its id is blake2b-256 of its canonical msgpack bytes,
so equal content gives an equal id and a stored snapshot can be checked against its key.

From version 3 every chunk reference carries the BLAKE3 digest of the bytes the chunk decodes to,
and a tensor's digest is a hash of its chunk list (`merkle_digest`) rather than of its bytes: the
chunk digests bind the bytes, so checking a tensor costs one decode and hash per distinct chunk and
the tensor digest itself is checked when the snapshot is parsed, from the snapshot alone.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from blockstore.core.chunks import MAX_CHUNK_SIZE
from blockstore.core.dtypes import DTYPE_BITS, nbytes_of
from blockstore.core.hashing import DIGEST_SIZE, KEY_SIZE, STRONG_SIZE, ChunkKey, digest

MANIFEST_VERSION = 3
"""2 added each tensor's measured error (lossy tiers); 3 added each chunk's strong (BLAKE3) digest
and defined the tensor digest over the chunk list. Versions 1 and 2 still read: error None, no
strong digests, tensor digests over the bytes."""
_READABLE_VERSIONS = (1, 2, 3)
LEGACY_CONTENT_VERSION = 2
"""The version a content id of a version 1 or 2 snapshot is built as (FORMAT.md §2)."""

SnapshotId = bytes
"""32 bytes: blake2b-256 of a snapshot's canonical bytes."""


class ManifestError(ValueError):
    """Snapshot bytes that do not describe a well-formed snapshot (the caller names the store)."""


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
"""Unicode's category Cc, all of it (C0, DEL, C1); one regex search instead of a category lookup per
character, which was a third of the time to open a snapshot."""


def control_character(name: str) -> str | None:
    """The first control character in a tensor name, as U+XXXX, or None. Names are printed by
    `show`, `verify` and errors; a name carrying terminal escapes could rewrite what users see."""
    found = _CONTROL.search(name)
    return f"U+{ord(found.group()):04X}" if found else None


_UNSAFE_CATEGORIES = {"Cc": "control character", "Cf": "format character", "Cs": "lone surrogate"}


def unsafe_character(name: str) -> str | None:
    """What makes a name unsafe to print or to use as a file name, e.g. "format character (U+202E)",
    or None. Refused: control characters (Cc: terminal escapes), format characters (Cf: bidi
    overrides such as U+202E and invisible characters, which make a name read as another) and
    lone surrogates (Cs: not encodable as UTF-8, so such a name cannot be stored or printed).

    Names are almost always ASCII, where only Cc can occur, so the regex decides those; other names
    are checked character by character against this Python's Unicode tables."""
    found = control_character(name)
    if found:
        return f"control character ({found})"
    if name.isascii():
        return None
    for character in name:
        kind = _UNSAFE_CATEGORIES.get(unicodedata.category(character))
        if kind:
            return f"{kind} (U+{ord(character):04X})"
    return None


INT64_MAX = 2**63 - 1


def shape_problem(shape: object) -> str | None:
    """Why `shape` cannot describe a tensor, or None. Every dimension, and the product of the
    non-zero ones, must fit in int64: that is what torch and numpy index with, and a zero dimension
    would otherwise let any other dimension through the byte-count check (0 * 2**64 == 0)."""
    if not isinstance(shape, (list, tuple)) or not all(map(is_count, shape)):
        return "not a list of non-negative integers"
    extent = 1
    for dimension in shape:
        if dimension > INT64_MAX:
            return f"dimension {dimension} exceeds int64"
        extent *= dimension or 1
        if extent > INT64_MAX:
            return "the product of its non-zero dimensions exceeds int64"
    return None


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a tensor: its key, its decoded length, the length of its stored value and (in
    snapshots of version 3) the BLAKE3 digest of its decoded bytes: what the snapshot promises the
    chunk is, whatever another chunk with a colliding key may be."""

    key: ChunkKey
    raw_len: int
    stored_len: int
    strong: bytes | None = None


def merkle_digest(dtype: str, shape: tuple[int, ...], chunks: tuple[ChunkRef, ...]) -> bytes:
    """A version 3 tensor digest: blake2b-256 of canonical msgpack `[dtype, shape, [[strong,
    raw_len], ...]]`. The strong digests bind every byte of the tensor, in order, so this binds the
    tensor's bytes and how they read (dtype, shape) without a pass over repeated bytes."""
    pairs = [[chunk.strong, chunk.raw_len] for chunk in chunks]
    return digest(msgpack.packb([dtype, list(shape), pairs], use_bin_type=True))


@dataclass(frozen=True)
class TensorError:
    """How far a lossy tier's decoded tensor is from the original: the largest absolute difference
    and the relative Frobenius norm ||decoded - original|| / ||original||."""

    max_abs: float
    rel_frobenius: float


@dataclass(frozen=True)
class TensorEntry:
    """Everything needed to rebuild and check one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    side: str
    tier: str
    codec: str
    chunks: tuple[ChunkRef, ...]
    digest: bytes
    error: TensorError | None = None
    merkle: bool = False
    """The digest is `merkle_digest` of the chunk list and every chunk has its strong digest (a
    snapshot of version 3); otherwise the digest is blake2b-256 of the tensor's bytes."""

    @property
    def nbytes(self) -> int:
        return sum(chunk.raw_len for chunk in self.chunks)

    @property
    def stored_bytes(self) -> int:
        return sum(chunk.stored_len for chunk in self.chunks)


@dataclass(frozen=True)
class SourceFile:
    """One packed safetensors file: its name, header bytes verbatim and tensors in data order."""

    name: str
    header: bytes
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class Snapshot:
    """One version of a model. Build it, hash it, publish it; never mutate a stored one."""

    files: tuple[SourceFile, ...]
    tensors: Mapping[str, TensorEntry]
    extras: Mapping[str, bytes] = field(default_factory=dict)
    parent: SnapshotId | None = None
    message: str = ""
    created_ns: int = 0
    version: int = MANIFEST_VERSION
    """3 for what blockstore writes; 1 or 2 for a snapshot read from an older pack."""

    def __post_init__(self) -> None:
        merkle = self.version >= 3
        for entry in self.tensors.values():
            if entry.merkle != merkle or any((c.strong is not None) != merkle for c in entry.chunks):
                form = "carry" if merkle else "lack"
                raise ValueError(
                    f"tensor {entry.name!r}: a version {self.version} snapshot's tensors {form} "
                    "strong chunk digests and a chunk-list digest"
                )

    def _content(self) -> list[Any]:
        """The fields that define the model itself (not its history): files, tensors, side files.
        Snapshots of versions 1 and 2 are built as version 2 (FORMAT.md §2)."""
        strong = self.version >= 3
        return [
            MANIFEST_VERSION if strong else LEGACY_CONTENT_VERSION,
            [[f.name, f.header, list(f.tensors)] for f in self.files],
            [_entry_fields(self.tensors[name], strong) for name in sorted(self.tensors)],
            [[name, self.extras[name]] for name in sorted(self.extras)],
        ]

    def to_bytes(self) -> bytes:
        """Canonical bytes: fixed field order, tensors sorted by name, extras sorted by name."""
        return msgpack.packb(
            [*self._content(), self.parent, self.message, self.created_ns], use_bin_type=True
        )

    @property
    def content_id(self) -> bytes:
        """blake2b-256 of the content alone: equal for the same model packed in two stores at two
        times (their snapshot ids differ by parent, message and time). Patches match bases by it."""
        return digest(msgpack.packb(self._content(), use_bin_type=True))

    @property
    def id(self) -> SnapshotId:
        return digest(self.to_bytes())

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.tensors.values())

    @property
    def stored_bytes(self) -> int:
        return sum(entry.stored_bytes for entry in self.tensors.values())

    def chunk_keys(self) -> set[ChunkKey]:
        """Every chunk this snapshot references (what gc keeps, what a patch's base already has)."""
        return {chunk.key for entry in self.tensors.values() for chunk in entry.chunks}

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Snapshot:
        """Parse stored snapshot bytes, refusing anything that is not a well-formed snapshot."""
        try:
            version, files, entries, extras, parent, message, created_ns = msgpack.unpackb(
                data, use_list=True, raw=False
            )
            if version not in _READABLE_VERSIONS:
                raise ManifestError(f"manifest version {version!r}, expected one of {_READABLE_VERSIONS}")
            strong = version >= 3
            tensors = {entry.name: entry for entry in (_entry_from_fields(e, strong) for e in entries)}
            snapshot = cls(
                files=tuple(SourceFile(str(n), bytes(h), tuple(map(str, t))) for n, h, t in files),
                tensors=tensors,
                extras={str(name): bytes(blob) for name, blob in extras},
                parent=_optional_id(parent),
                message=str(message),
                created_ns=int(created_ns),
                version=version,
            )
        except ManifestError:
            raise
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ManifestError(f"malformed snapshot ({exc})") from None
        if len(tensors) != len(entries):
            raise ManifestError("snapshot lists a tensor name twice")
        for name in [f.name for f in snapshot.files] + list(snapshot.extras):
            if not _is_plain_file_name(name):
                raise ManifestError(f"file name {name!r} is not a plain file name")
        listed = [name for f in snapshot.files for name in f.tensors]
        if sorted(listed) != sorted(tensors):
            raise ManifestError("the files' tensor lists do not match the tensor entries")
        return snapshot


def _entry_fields(entry: TensorEntry, strong: bool) -> list[Any]:
    chunks = (
        [[c.key, c.raw_len, c.stored_len, c.strong] for c in entry.chunks]
        if strong
        else [[c.key, c.raw_len, c.stored_len] for c in entry.chunks]
    )
    return [
        entry.name,
        entry.dtype,
        list(entry.shape),
        entry.side,
        entry.tier,
        entry.codec,
        chunks,
        entry.digest,
        [entry.error.max_abs, entry.error.rel_frobenius] if entry.error else None,
    ]


def _chunk_refs(name: object, chunks: list[Any], strong: bool) -> tuple[ChunkRef, ...]:
    """A tensor's chunk references: `[key, raw_len, stored_len]`, plus the strong digest in a
    version 3 snapshot. Bounds before anything allocates by these numbers: a reader sizes its
    buffers from them."""
    width = 4 if strong else 3
    refs = []
    for fields in chunks:
        if not (isinstance(fields, list) and len(fields) == width):
            raise ManifestError(f"tensor {name!r} has a malformed chunk reference")
        key, raw_len, stored_len = fields[:3]
        check = fields[3] if strong else None
        if not (
            isinstance(key, bytes)
            and len(key) == KEY_SIZE
            and is_count(raw_len)
            and 0 < raw_len <= MAX_CHUNK_SIZE
            and is_count(stored_len)
            and (not strong or (isinstance(check, bytes) and len(check) == STRONG_SIZE))
        ):
            raise ManifestError(f"tensor {name!r} has a malformed chunk reference")
        refs.append(ChunkRef(key, raw_len, stored_len, check))
    return tuple(refs)


def _entry_from_fields(fields: list[Any], strong: bool) -> TensorEntry:
    name, dtype, shape, side, tier, codec, chunks, tensor_digest, *rest = fields
    if len(rest) > 1:
        raise ManifestError(f"tensor {name!r} has {len(fields)} fields")
    error = TensorError(float(rest[0][0]), float(rest[0][1])) if rest and rest[0] is not None else None
    if not isinstance(tensor_digest, bytes) or len(tensor_digest) != DIGEST_SIZE:
        raise ManifestError(f"tensor {name!r} has a malformed digest")
    if not isinstance(name, str) or unsafe_character(name):
        raise ManifestError(f"tensor name {name!r} is not a string without control or format characters")
    if dtype not in DTYPE_BITS:
        raise ManifestError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or shape_problem(shape):
        raise ManifestError(f"tensor {name!r} has an invalid shape")
    if not isinstance(chunks, list):
        raise ManifestError(f"tensor {name!r} has a malformed chunk list")
    refs = _chunk_refs(name, chunks, strong)
    if sum(ref.raw_len for ref in refs) != nbytes_of(dtype, math.prod(shape)):
        raise ManifestError(f"tensor {name!r}: its chunks do not add up to {dtype}{shape}")
    if strong and merkle_digest(dtype, tuple(shape), refs) != tensor_digest:
        raise ManifestError(f"tensor {name!r}: its digest does not match its chunk list")
    return TensorEntry(
        name,
        dtype,
        tuple(shape),
        str(side),
        str(tier),
        str(codec),
        refs,
        tensor_digest,
        error,
        merkle=strong,
    )


def _is_plain_file_name(name: str) -> bool:
    """Names a snapshot may write on export: no directories, no hidden or special names, and
    nothing a terminal would act on when `ls` prints the exported directory."""
    return (
        bool(name)
        and Path(name).name == name
        and not name.startswith(".")
        and "\\" not in name
        and unsafe_character(name) is None
    )


def is_count(value: object) -> bool:
    """A non-negative int that is not a bool (JSON and msgpack both decode true as a number's kin)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _optional_id(value: object) -> SnapshotId | None:
    if value is None:
        return None
    if not isinstance(value, bytes) or len(value) != DIGEST_SIZE:
        raise ManifestError("malformed parent id")
    return value

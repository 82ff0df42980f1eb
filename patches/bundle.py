"""The `.bsp` patch bundle file format: write one, and read one back only after it checks out.

Layout (all integers little-endian; FORMAT.md is the full description):

    magic "\\x89BSP\\r\\n\\x1a\\n" | u16 version | u16 flags | u64 header length H
    header: msgpack map {base, base_content, target, snapshot_len, chunks: [[key, raw_len, stored_len], ...]}
    target snapshot bytes (canonical; hashes to `target`)
    chunk values, in header order (the store's chunk values: codec id, params, encoded bytes)
    footer: blake2b-256 of every byte before it
    [flags bit 0] keyed blake2b-256 (MAC) of the same bytes, under the key file's key

The whole file is hashed (and MAC-checked) before the header is trusted. No filesystem paths are
stored. Written to a temporary name, fsynced and renamed.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from blockstore.core.chunks import MAX_CHUNK_SIZE, is_delta_value
from blockstore.core.hashing import DIGEST_SIZE, KEY_SIZE, ChunkKey, digest
from blockstore.core.manifests import SnapshotId, is_count
from blockstore.errors import BundleRejected, InvalidArgument
from blockstore.ops.export import write_atomically

MAGIC = b"\x89BSP\r\n\x1a\n"
FORMAT_VERSION = 3
DELTA_VERSION = 4
READABLE_VERSIONS = (1, 2, FORMAT_VERSION, DELTA_VERSION)
"""Version 2 bundles may carry framed chunk values (FORMAT.md §1), which version-1 readers cannot
decode; version 3 bundles may carry a version 3 target snapshot (strong chunk digests), which
earlier readers cannot parse; version 4 bundles may carry delta chunks (written only for those
that do). The layout of the bundle itself is unchanged."""
FLAG_MAC = 1
_PREAMBLE = struct.Struct("<8sHHQ")
_MAX_HEADER = 1 << 30
_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class BundleChunk:
    key: ChunkKey
    raw_len: int
    stored_len: int
    offset: int = 0
    """Where the stored value starts in the bundle file (set when reading)."""


@dataclass(frozen=True)
class Bundle:
    """A bundle that passed its footer (and MAC) check; chunk values are read on demand."""

    path: Path
    base: SnapshotId | None
    base_content: bytes | None
    target: SnapshotId
    snapshot: bytes
    chunks: tuple[BundleChunk, ...]

    def chunk_values(self) -> Iterator[tuple[BundleChunk, bytes]]:
        """Each shipped chunk with its stored value, read in file order through one handle."""
        with open(self.path, "rb") as handle:
            for chunk in self.chunks:
                handle.seek(chunk.offset)
                yield chunk, handle.read(chunk.stored_len)


def read_key(path: Path) -> bytes:
    """A MAC key from a key file: any bytes, hashed down to the 32 bytes keyed blake2b takes."""
    try:
        material = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read key file ({exc.strerror})") from None
    if len(material) < 16:
        raise InvalidArgument(f"{path}: a key file must hold at least 16 bytes")
    return digest(material)


def _mac(key: bytes) -> hashlib.blake2b:
    return hashlib.blake2b(key=key, digest_size=DIGEST_SIZE)


def write_bundle(
    out: Path,
    base: SnapshotId | None,
    base_content: bytes | None,
    target: SnapshotId,
    snapshot: bytes,
    chunks: Iterable[tuple[BundleChunk, bytes]],
    key: bytes | None = None,
) -> int:
    """Write a bundle atomically; `chunks` yields (chunk, stored value). Returns the file size."""
    chunk_list = list(chunks)
    version = DELTA_VERSION if any(is_delta_value(value) for _, value in chunk_list) else FORMAT_VERSION
    header = msgpack.packb(
        {
            "base": base,
            "base_content": base_content,
            "target": target,
            "snapshot_len": len(snapshot),
            # The value's own length: a snapshot's stored_len is what the store that wrote it held.
            "chunks": [[c.key, c.raw_len, len(value)] for c, value in chunk_list],
        },
        use_bin_type=True,
    )

    def blocks() -> Iterator[bytes]:
        hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
        mac = _mac(key) if key is not None else None
        flags = FLAG_MAC if key is not None else 0
        body = [_PREAMBLE.pack(MAGIC, version, flags, len(header)), header, snapshot]
        for block in [*body, *(value for _, value in chunk_list)]:
            hasher.update(block)
            if mac is not None:
                mac.update(block)
            yield block
        yield hasher.digest()
        if mac is not None:
            yield mac.digest()

    return write_atomically(out, blocks())


def _check_integrity(path: Path, size: int, footer_len: int, key: bytes | None) -> None:
    """Hash every byte before the footer and compare with it (and the MAC) in constant time."""
    hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
    mac = _mac(key) if key is not None else None
    with open(path, "rb") as handle:
        remaining = size - footer_len
        while remaining:
            block = handle.read(min(_READ_BLOCK, remaining))
            if not block:
                raise BundleRejected(path, "file ended early")
            hasher.update(block)
            if mac is not None:
                mac.update(block)
            remaining -= len(block)
        footer = handle.read(footer_len)
    if not hmac.compare_digest(footer[:DIGEST_SIZE], hasher.digest()):
        raise BundleRejected(path, "checksum mismatch (the file is damaged, truncated or was altered)")
    if mac is not None and not hmac.compare_digest(footer[DIGEST_SIZE:], mac.digest()):
        raise BundleRejected(path, "MAC mismatch: wrong key, or the bundle was altered")


def read_bundle(path: Path, key: bytes | None = None) -> Bundle:
    """Open a bundle, refusing it unless magic, version, footer and (when signed) MAC all check."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            preamble = handle.read(_PREAMBLE.size)
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read ({exc.strerror})") from None
    if len(preamble) < _PREAMBLE.size:
        raise BundleRejected(path, "too short to be a bundle")
    magic, version, flags, header_len = _PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise BundleRejected(path, "not a blockstore patch bundle (bad magic)")
    if version not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise BundleRejected(
            path, f"format version {version} is not supported (this blockstore reads {readable})"
        )
    if flags & ~FLAG_MAC:
        raise BundleRejected(path, f"unknown flags {flags:#x}")
    signed = bool(flags & FLAG_MAC)
    if signed and key is None:
        raise BundleRejected(path, "bundle is signed; pass --key with its key file")
    if not signed and key is not None:
        raise BundleRejected(path, "bundle is not signed but a key was given; refusing an unsigned bundle")
    footer_len = DIGEST_SIZE * (2 if signed else 1)
    if header_len > min(_MAX_HEADER, size):
        raise BundleRejected(path, f"header length {header_len} is impossible for a {size}-byte file")
    _check_integrity(path, size, footer_len, key)
    with open(path, "rb") as handle:
        handle.seek(_PREAMBLE.size)
        header_bytes = handle.read(header_len)
        try:
            header = msgpack.unpackb(header_bytes, raw=False)
            base, base_content = header["base"], header["base_content"]
            target, snapshot_len = header["target"], header["snapshot_len"]
            listed = [(k, r, s) for k, r, s in header["chunks"]]
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise BundleRejected(path, f"malformed header ({exc})") from None
        # The footer only proves the file is whole, not that its writer was honest: bound every
        # number before it sizes a read or a buffer.
        if not is_count(snapshot_len) or snapshot_len > size:
            raise BundleRejected(path, f"snapshot length {snapshot_len!r} is impossible")
        for chunk_key, raw_len, stored_len in listed:
            if not (
                isinstance(chunk_key, bytes)
                and len(chunk_key) == KEY_SIZE
                and is_count(raw_len)
                and 0 < raw_len <= MAX_CHUNK_SIZE
                and is_count(stored_len)
                and stored_len <= size
            ):
                raise BundleRejected(path, f"malformed chunk entry {[chunk_key, raw_len, stored_len]!r:.120}")
        snapshot = handle.read(snapshot_len)
    if not (
        _is_id(target) and (base is None or _is_id(base)) and (base_content is None or _is_id(base_content))
    ):
        raise BundleRejected(path, "malformed base or target id")
    offset = _PREAMBLE.size + header_len + snapshot_len
    chunks = []
    for chunk_key, raw_len, stored_len in listed:
        chunks.append(BundleChunk(chunk_key, raw_len, stored_len, offset))
        offset += stored_len
    if offset + footer_len != size or len(snapshot) != snapshot_len:
        raise BundleRejected(path, "header does not account for the file's size")
    if digest(snapshot) != target:
        raise BundleRejected(path, "target snapshot does not hash to the target id")
    return Bundle(path, base, base_content, target, snapshot, tuple(chunks))


def _is_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == DIGEST_SIZE

"""The three hashes blockstore uses, and why there are three.

- Chunk keys are xxh3-128 of a chunk's raw (decoded) bytes: fast enough to key every 4 MiB chunk at
  memory speed, and good as an index and checksum, but not collision resistant: two different
  chunks with one key can be built on purpose.
- Strong chunk digests are BLAKE3-256 of a chunk's raw bytes: what a snapshot promises each chunk
  decodes to, so dedup (`pack` reusing a stored chunk) and every reader compare against a hash
  nobody can collide. BLAKE3 because it runs at several GB/s on one core, close to the decoders.
- Digests are blake2b-256: a tensor's digest (over its chunk list in snapshots of version 3, over
  its bytes before) and a snapshot's id are what integrity rests on (verify, export, patches).
"""

from __future__ import annotations

import hashlib

import xxhash
from blake3 import blake3

ChunkKey = bytes
"""16 bytes: xxh3-128 of a chunk's raw (decoded) bytes."""
KEY_SIZE = 16

DIGEST_SIZE = 32
STRONG_SIZE = 32
"""Bytes of a strong chunk digest (BLAKE3's default output)."""


def chunk_key(raw: bytes | memoryview) -> ChunkKey:
    """Content key of one chunk's raw bytes."""
    return xxhash.xxh3_128_digest(raw)


def strong_digest(raw: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3-256 of one chunk's raw bytes, hashed where they lie (no copy; the GIL is released
    for large inputs, so decode threads hash in parallel)."""
    return blake3(raw).digest()


def new_digest() -> hashlib.blake2b:
    """An incremental blake2b-256, fed a tensor's bytes in order."""
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """blake2b-256 of `data` in one call."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()

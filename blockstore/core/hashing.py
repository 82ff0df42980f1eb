"""The two hashes blockstore uses, and why there are two.

- Chunk keys are xxh3-128 of a chunk's raw bytes: fast enough to key every 4 MiB chunk at memory
  speed, and good for dedup, but not collision resistant.
- Digests are blake2b-256: a tensor's digest and a snapshot's id are what integrity rests on
  (verify, export, patches), so they use a cryptographic hash.
"""

from __future__ import annotations

import hashlib

import xxhash

ChunkKey = bytes
"""16 bytes: xxh3-128 of a chunk's raw (decoded) bytes."""
KEY_SIZE = 16

DIGEST_SIZE = 32


def chunk_key(raw: bytes | memoryview) -> ChunkKey:
    """Content key of one chunk's raw bytes."""
    return xxhash.xxh3_128_digest(raw)


def new_digest() -> hashlib.blake2b:
    """An incremental blake2b-256, fed a tensor's bytes in order."""
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """blake2b-256 of `data` in one call."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()

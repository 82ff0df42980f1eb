"""`apply`: check a bundle completely, and only then add its chunks and move the ref.

Order: footer and MAC → format → base matches the ref → target snapshot parses and hashes to its
id → every chunk the target needs is shipped or present → the bundle's growth is within its bound
(before any decoding) → every shipped chunk is decoded and checked against its key, and a shipped
chunk whose key the store already has must carry the same bytes (xxh3 is not collision resistant)
→ every NEW target tensor is checked: in a version 3 snapshot each of its chunks against the strong
digest the target promises (the tensor digest, over the chunk list, was checked when the target
was parsed), in an older one its bytes against its digest → only now: chunks inserted → snapshot
written → ref moved with compare-and-set. A refused bundle writes nothing at all; a crash during
the writes leaves the ref, and so everything readable, as it was, with at worst unreferenced chunks
for `gc`.

Verification costs what is new, not what the model weighs. A target tensor equal to a tensor of the
base (same dtype, shape, chunk list and digest) was checked when the base was packed or applied, so
it is not read again; each distinct chunk is decoded once however many tensors or positions repeat
it. And a bundle may not make the store hold unboundedly more than it carries: see `growth_limit`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from blockstore.codecs.nibbles import Difference
from blockstore.core.chunks import decode_chunk, decode_chunk_into, delta_base_at_start, strong_mismatch
from blockstore.core.hashing import ChunkKey, new_digest, strong_digest
from blockstore.core.manifests import (
    MANIFEST_VERSION,
    ChunkRef,
    ManifestError,
    Snapshot,
    SnapshotId,
    TensorEntry,
    merkle_digest,
)
from blockstore.errors import BlockstoreError, BundleRejected, ChunkCorrupt, InvalidArgument, WrongBase
from blockstore.repo import DEFAULT_REF, Repository, StoredDigests, check_ref_name
from blockstore.storage.base import short_id

from .bundle import Bundle, BundleChunk, read_bundle

DEFAULT_MAX_GROWTH = 64
"""How many bytes of new tensors a bundle may declare per byte it carries or reuses (see
`growth_limit`). Real patches stay far below it: compressed weights are a few times smaller than
raw (8 to 10 for an int4 tier), and a chunk repeats only in constant regions."""

_REPEAT_CACHE_BYTES = 1 << 30
"""Decoded bytes of repeated chunks kept for their later uses while new tensors are hashed; a
chunk repeated past this much held memory is decoded again (correct, only slower)."""


@dataclass(frozen=True)
class ApplyResult:
    ref: str
    old: SnapshotId | None
    new: SnapshotId
    chunks_added: int
    bytes_added: int

    def to_json(self) -> dict[str, object]:
        return {
            "ref": self.ref,
            "old": self.old.hex() if self.old else None,
            "new": self.new.hex(),
            "chunks_added": self.chunks_added,
            "bytes_added": self.bytes_added,
        }


def _check_base(
    repo: Repository, bundle: Bundle, target: Snapshot, ref: str, current: SnapshotId | None, force_base: bool
) -> Snapshot | None:
    """The ref must hold the bundle's base: the same snapshot, or the same model content packed
    separately (another store's pack of the same file has another id but the same content).

    A ref still at a snapshot of an older version cannot show the content id of a version 3 base
    (that needs its chunks' strong digests), so for a version 3 target such a ref's snapshot is
    read once into its version 3 form (`as_version_3`) and matched by that; the form is returned,
    and vouches for every chunk it hashed."""
    if bundle.base == current:
        return None
    held = repo.snapshot(current) if current is not None else None
    if held is not None and bundle.base_content == held.content_id:
        return None
    if force_base and bundle.base is not None and repo.has_snapshot(bundle.base):
        return None
    if held is not None and current is not None and held.version < 3 <= target.version:
        upgraded = as_version_3(repo, current, held)
        if bundle.base_content == upgraded.content_id:
            return upgraded
    base = short_id(bundle.base) if bundle.base else "(none)"
    raise WrongBase(bundle.path.name, base, ref, short_id(current))


def as_version_3(repo: Repository, snapshot_id: SnapshotId, snapshot: Snapshot) -> Snapshot:
    """The version 3 form of an older snapshot of this store (not stored): every chunk decoded
    and each tensor checked against its byte digest, then each chunk given its strong digest and
    each tensor its chunk-list digest. Costs one pass over the model, like `verify --deep`."""
    tensors = {}
    for name, entry in snapshot.tensors.items():
        chunks = tuple(
            replace(chunk, strong=strong_digest(raw))
            for chunk, raw in zip(entry.chunks, repo.tensor_chunks(snapshot_id, entry), strict=True)
        )
        tensor_digest = merkle_digest(entry.dtype, entry.shape, chunks)
        tensors[name] = replace(entry, chunks=chunks, digest=tensor_digest, merkle=True)
    return replace(snapshot, tensors=tensors, version=MANIFEST_VERSION)


def tensor_identity(entry: TensorEntry) -> tuple:
    """What makes two tensor entries hold the same checked bytes: dtype, shape, chunk list (keys,
    raw lengths and strong digests; stored lengths are informational) and digest. The name is not
    part of it: a renamed tensor is as checked as it was under its old name."""
    chunks = tuple((c.key, c.raw_len, c.strong) for c in entry.chunks)
    return entry.dtype, entry.shape, chunks, entry.digest


def new_tensors(target: Snapshot, bases: Iterable[Snapshot]) -> list[TensorEntry]:
    """The target's tensors that equal no tensor of any of `bases` (snapshots the store holds and
    that were checked when they came in): the only ones `apply` must read."""
    known = {tensor_identity(entry) for base in bases for entry in base.tensors.values()}
    return [entry for entry in target.tensors.values() if tensor_identity(entry) not in known]


@dataclass(frozen=True)
class Growth:
    """What a bundle asks the store to take on, in bytes, measured from the header and target
    snapshot alone (nothing decoded)."""

    new_bytes: int
    """Raw bytes of the target's new tensors: what `export` would write and the runtime allocate."""
    shipped_raw: int
    """Decoded bytes of the chunks the bundle ships: what checking them decodes."""
    carried: int
    """The bundle file's size."""
    reused: int
    """Raw bytes of the distinct stored chunks the new tensors reference (base chunks, mostly)."""


def growth_limit(growth: Growth, factor: int) -> int:
    """The most bytes a bundle may declare: `factor` x (its file size + the raw bytes of the stored
    chunks its new tensors reuse). Every new byte must be paid for by a byte the bundle carries or
    a byte the store already holds, amplified at most `factor` times by compression and repetition.
    Bounding by the file size rather than by the shipped chunks' decoded size matters: zstd turns a
    few KiB into a 256 MiB zero chunk, so a decoded-size bound would let a tiny bundle declare
    terabytes. The same limit bounds the decoded size of what the bundle ships, so checking a
    bundle's chunks costs at most `factor` times its size as well."""
    return factor * (growth.carried + growth.reused)


def _check_growth(bundle: Bundle, fresh: list[TensorEntry], present: set[ChunkKey], factor: int) -> None:
    """Refuse, before decoding anything, a bundle that declares more than `growth_limit` allows."""
    shipped = {chunk.key: chunk.raw_len for chunk in bundle.chunks}
    referenced = {c.key: c.raw_len for entry in fresh for c in entry.chunks}
    growth = Growth(
        new_bytes=sum(entry.nbytes for entry in fresh),
        shipped_raw=sum(shipped.values()),
        carried=bundle.path.stat().st_size,
        reused=sum(raw_len for key, raw_len in referenced.items() if key in present and key not in shipped),
    )
    limit = growth_limit(growth, factor)
    for what, figure in (("new tensor bytes", growth.new_bytes), ("decoded chunk bytes", growth.shipped_raw)):
        if figure > limit:
            raise BundleRejected(
                bundle.path,
                f"declares {figure} {what}, over the limit of {limit} ({factor} x "
                f"({growth.carried} bundle bytes + {growth.reused} reused stored bytes)); "
                "raise it with --max-growth if the bundle is trusted",
            )


class _ChunkSource:
    """Decoded bytes of the target's chunks, each distinct key decoded once: from the bundle if it
    ships the key, else from the store. A shipped chunk whose key the store already has must be the
    stored chunk (xxh3 keys can collide), compared by strong digest. Bytes of a chunk with more uses
    ahead are kept (up to `_REPEAT_CACHE_BYTES`) and dropped at its last use."""

    def __init__(
        self,
        repo: Repository,
        bundle: Bundle,
        handle: BinaryIO,
        shipped: dict[ChunkKey, BundleChunk],
        present: set[ChunkKey],
        digests: StoredDigests,
    ) -> None:
        self.repo, self.bundle, self.handle = repo, bundle, handle
        self.shipped, self.present, self.digests = shipped, present, digests
        self.uses: Counter[ChunkKey] = Counter()
        self.kept: dict[ChunkKey, bytearray] = {}
        self.kept_bytes = 0
        self.checked: set[ChunkKey] = set()
        """Shipped chunks decoded and checked so far."""

    def shipped_chunk(self, chunk: BundleChunk) -> tuple[bytearray, bytes]:
        """A shipped chunk decoded from the bundle and checked against its key (and the store's
        chunk under that key), with its strong digest."""
        self.handle.seek(chunk.offset)
        raw = decode_chunk(chunk.key, self.handle.read(chunk.stored_len), chunk.raw_len, base=self.base_bytes)
        strong = strong_digest(raw)
        if chunk.key in self.present and self.digests.of(chunk.key, chunk.raw_len) != strong:
            raise BundleRejected(
                self.bundle.path, f"chunk {chunk.key.hex()} collides with a stored chunk of other bytes"
            )
        self.checked.add(chunk.key)
        return raw, strong

    def base_bytes(
        self, key: ChunkKey, out: memoryview, difference: Difference | None = None, /
    ) -> bytes | bytearray | memoryview:
        """The base of a shipped delta chunk, decoded and checked against its key (a `BaseReader`;
        it never adds the `difference` itself: an apply checks every base it reads): from the
        bundle when it ships the base, else from the store (`_verified_shipment` made sure one
        has it)."""
        chunk = self.shipped.get(key)
        if chunk is None:  # (a delta here, if another pack stored it so: `rooted_value` re-roots)
            return self.repo.read_chunk(ChunkRef(key, len(out), 0))
        if chunk.raw_len != len(out):
            raise ChunkCorrupt(key.hex(), f"a base of {chunk.raw_len} bytes for a delta of {len(out)}")
        self.handle.seek(chunk.offset)
        decode_chunk_into(key, self.handle.read(chunk.stored_len), out)
        return out

    def strong_of(self, key: ChunkKey, raw_len: int) -> bytes:
        """The strong digest of the bytes chunk `key` would have in the store after the apply."""
        chunk = self.shipped.get(key)
        return self.shipped_chunk(chunk)[1] if chunk else self.digests.of(key, raw_len)

    def take(self, key: ChunkKey, raw_len: int) -> bytearray:
        """The bytes of one use of chunk `key` (counted in `uses` beforehand)."""
        self.uses[key] -= 1
        raw = self.kept.pop(key, None)
        if raw is None:
            chunk = self.shipped.get(key)
            raw = self.shipped_chunk(chunk)[0] if chunk else self.repo.read_chunk(ChunkRef(key, raw_len, 0))
        else:
            self.kept_bytes -= len(raw)
        if self.uses[key] > 0 and self.kept_bytes + len(raw) <= _REPEAT_CACHE_BYTES:
            self.kept[key] = raw
            self.kept_bytes += len(raw)
        return raw


def _reject_as_bundle(bundle: Bundle, tensor: str | None, exc: BlockstoreError) -> BundleRejected:
    """A chunk's own error (damaged, missing) as the bundle's refusal, naming the tensor."""
    if isinstance(exc, BundleRejected):
        return exc
    return BundleRejected(bundle.path, f"tensor {tensor!r}: {exc}" if tensor else str(exc))


def _check_tensor_bytes(bundle: Bundle, fresh: list[TensorEntry], source: _ChunkSource) -> None:
    """Snapshots before version 3: each new tensor's bytes, in order, against its digest."""
    source.uses.update(chunk.key for entry in fresh for chunk in entry.chunks)
    for entry in fresh:
        hasher = new_digest()
        for chunk in entry.chunks:
            try:
                hasher.update(source.take(chunk.key, chunk.raw_len))
            except BlockstoreError as exc:
                raise _reject_as_bundle(bundle, entry.name, exc) from None
        if hasher.digest() != entry.digest:
            raise BundleRejected(bundle.path, f"tensor {entry.name!r} does not match its digest")


def _check_promises(bundle: Bundle, target: Snapshot, fresh: list[TensorEntry], source: _ChunkSource) -> None:
    """Version 3: parsing the target checked every tensor digest against its chunk list, so a new
    tensor is sound when each of its chunks is the bytes promised, by strong digest. Each distinct
    chunk is checked once: a shipped one decoded, a stored one by what the store knows of it (the
    snapshots at its refs and the bases vouch for their chunks; any other is decoded once)."""
    promised: dict[ChunkKey, bytes | None] = {}
    owner: dict[ChunkKey, str] = {}
    for entry in target.tensors.values():
        for chunk in entry.chunks:
            if promised.setdefault(chunk.key, chunk.strong) != chunk.strong:
                detail = f"tensor {entry.name!r}: chunk {chunk.key.hex()} is promised as two byte strings"
                raise BundleRejected(bundle.path, detail)
            owner.setdefault(chunk.key, entry.name)
    wanted = {chunk.key: chunk.raw_len for entry in fresh for chunk in entry.chunks}
    wanted.update((key, chunk.raw_len) for key, chunk in source.shipped.items())
    for key, raw_len in wanted.items():
        try:
            found = source.strong_of(key, raw_len)
        except BlockstoreError as exc:
            raise _reject_as_bundle(bundle, owner[key], exc) from None
        if found != promised[key]:
            raise BundleRejected(
                bundle.path,
                f"tensor {owner[key]!r}: chunk {key.hex()} is not the bytes the target promises "
                f"({strong_mismatch(True) if key in source.present else 'BLAKE3 mismatch'})",
            )


def _verified_shipment(
    repo: Repository, bundle: Bundle, target: Snapshot, bases: list[Snapshot], max_growth: int
) -> list[BundleChunk]:
    """Check the bundle's growth bound, every shipped chunk and every new tensor before anything is
    written; returns the shipped chunks the store lacks. Raises BundleRejected naming the first
    problem."""
    shipped = {chunk.key: chunk for chunk in bundle.chunks}
    needed = target.chunk_keys()
    delta_bases = _shipped_delta_bases(bundle)
    wanted_bases = set(delta_bases.values())
    present = repo.has_chunks(needed | shipped.keys() | wanted_bases)
    absent = needed - shipped.keys() - present
    if absent:
        raise BundleRejected(
            bundle.path, f"target needs chunk {min(absent).hex()} which neither the bundle nor the store has"
        )
    unmet = sorted(
        (key, base) for key, base in delta_bases.items() if base not in shipped and base not in present
    )
    if unmet:
        key, base = unmet[0]
        raise BundleRejected(
            bundle.path,
            f"ships chunk {key.hex()} as a delta against chunk {base.hex()}, which neither the bundle "
            "nor the store has (make the bundle against a version this store holds)",
        )
    unused = shipped.keys() - needed - wanted_bases
    if unused:
        raise BundleRejected(bundle.path, f"ships chunk {min(unused).hex()} which the target does not use")
    fresh = new_tensors(target, bases)
    _check_growth(bundle, fresh, present, max_growth)
    with open(bundle.path, "rb") as handle:
        source = _ChunkSource(repo, bundle, handle, shipped, present, repo.stored_digests(bases))
        if target.version >= 3:
            _check_promises(bundle, target, fresh, source)
        else:
            _check_tensor_bytes(bundle, fresh, source)
        # Shipped chunks no new tensor uses are still checked: the store must never take a value
        # that does not decode to its key, nor one that differs from the chunk it already holds.
        for key, chunk in shipped.items():
            if key not in source.checked:
                try:
                    source.shipped_chunk(chunk)
                except BlockstoreError as exc:
                    raise _reject_as_bundle(bundle, None, exc) from None
    return [chunk for key, chunk in shipped.items() if key not in present]


def _shipped_delta_bases(bundle: Bundle) -> dict[ChunkKey, ChunkKey]:
    """The base each shipped delta chunk names, from the start of its value (no payload is read)."""
    found: dict[ChunkKey, ChunkKey] = {}
    with open(bundle.path, "rb") as handle:
        for chunk in bundle.chunks:

            def read(length: int, chunk: BundleChunk = chunk) -> bytes:
                handle.seek(chunk.offset)
                return handle.read(min(length, chunk.stored_len))

            base = delta_base_at_start(read)
            if base is not None:
                found[chunk.key] = base
    return found


def _bases(repo: Repository, bundle: Bundle, current: SnapshotId | None) -> list[Snapshot]:
    """The checked snapshots the target is compared with: what the ref holds, and the bundle's
    base if the store has it (`--force-base`, or the same snapshot)."""
    ids = {snapshot_id for snapshot_id in (current, bundle.base) if snapshot_id is not None}
    return [repo.snapshot(snapshot_id) for snapshot_id in ids if repo.has_snapshot(snapshot_id)]


def _shipped_values(bundle: Bundle, chunks: list[BundleChunk]) -> Iterator[tuple[ChunkKey, bytes]]:
    """(key, stored value) of `chunks`, read from the bundle in file order."""
    wanted = {chunk.key for chunk in chunks}
    return ((chunk.key, value) for chunk, value in bundle.chunk_values() if chunk.key in wanted)


def apply(
    repo: Repository,
    bundle_path: Path,
    *,
    ref: str = DEFAULT_REF,
    key: bytes | None = None,
    force_base: bool = False,
    max_growth: int = DEFAULT_MAX_GROWTH,
) -> ApplyResult:
    """Apply a bundle to `ref`; raises (and changes nothing readable) unless every check passes.
    `max_growth` is the factor of `growth_limit`: raise it for a trusted bundle whose new tensors
    are mostly one repeated chunk (say, a large zero-initialized layer)."""
    check_ref_name(ref)
    if isinstance(max_growth, bool) or not isinstance(max_growth, int) or max_growth < 1:
        raise InvalidArgument(f"--max-growth must be a whole number of at least 1, not {max_growth!r}")
    bundle = read_bundle(bundle_path, key)
    current = repo.ref(ref)
    if current == bundle.target:  # applied already (e.g. re-run after a crash): nothing to do
        return ApplyResult(ref, current, bundle.target, 0, 0)
    try:
        target = Snapshot.from_bytes(bundle.snapshot)
    except ManifestError as exc:
        raise BundleRejected(bundle_path, f"target snapshot: {exc}") from None
    upgraded = _check_base(repo, bundle, target, ref, current, force_base)
    bases = _bases(repo, bundle, current) + ([upgraded] if upgraded else [])
    with repo.writer_lease():
        new_chunks = _verified_shipment(repo, bundle, target, bases, max_growth)
        sizes = {chunk.key: chunk.raw_len for chunk in new_chunks}
        shipped = _shipped_values(bundle, new_chunks)
        added = repo.put_chunks((key, repo.rooted_value(key, value, sizes[key])) for key, value in shipped)
        repo.store_snapshot_bytes(bundle.snapshot)  # read_bundle checked it hashes to bundle.target
        repo.move_ref(ref, bundle.target, current, "apply", target.message)
    return ApplyResult(ref, current, bundle.target, len(new_chunks), added)

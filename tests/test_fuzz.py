"""Hypothesis fuzzing of the three readers of untrusted bytes: the safetensors reader (through `pack`),
the bundle reader (through `apply`) and the chunk decoder.

Every case must end in success with exact bytes, or in a one-line error of the project's hierarchy —
never another exception, never Python allocations beyond a bound set by the input's real size, and
never a write to the store. BLOCKSTORE_FUZZ_EXAMPLES sets the examples per target (CI: 100).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tempfile
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockstore.codecs import CODECS, ByteGroupZstd, Nibbles, Raw, Zstd, framing, lossy_codec, lossy_ids
from blockstore.core.chunks import MAX_CHUNK_SIZE, chunk_value, decode_chunk
from blockstore.core.dtypes import DTYPE_BITS
from blockstore.core.hashing import DIGEST_SIZE, digest
from blockstore.errors import BlockstoreError, ChunkCorrupt
from blockstore.ops.export import export
from blockstore.ops.pack import pack
from blockstore.ops.verify import verify
from blockstore.patches import apply
from blockstore.patches.bundle import _PREAMBLE, DELTA_VERSION, MAGIC, read_bundle
from blockstore.repo import Repository

from .faults import float_tensor
from .helpers import FUZZ_EXAMPLES, RawTensor, cli, write_safetensors

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SLACK = 4 << 20
"""Python allocations allowed beyond what the input's own size justifies (interpreter noise)."""


@contextmanager
def allocation_bound(limit: int) -> Iterator[None]:
    """Fail if Python allocations peak above `limit` bytes inside the block."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= limit, f"allocated {peak} bytes, bound {limit}"


def store_state(store: Path) -> tuple:
    with Repository.open(store) as repo:
        return repo.store.refs(), sorted(repo.store.snapshot_ids()), sorted(repo.store.iter_keys())


def refused_cleanly(exc: BlockstoreError) -> None:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message, message


# --- safetensors reader ------------------------------------------------------------------------------

VALID_HEADER = {
    "a": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
    "b": {"dtype": "BF16", "shape": [3], "data_offsets": [32, 38]},
}
BODY = bytes(range(38))

numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, 0, 38, 39]),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)
names = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["../../etc/passwd", "a/b", "a\\b", "x\x1b[2J", "\x00", "__metadata__", "", "b"]),
)


@st.composite
def hostile_safetensors(draw: st.DrawFn) -> bytes:
    """A valid two-tensor file with one or more hostile edits."""
    header = json.loads(json.dumps(VALID_HEADER))
    body = BODY
    declared: int | None = None
    raw_header: bytes | None = None
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(
            st.sampled_from(
                [
                    "name",
                    "dtype",
                    "shape",
                    "offsets",
                    "metadata",
                    "length",
                    "utf8",
                    "duplicate",
                    "body",
                    "json",
                ]
            )
        )
        victim = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__") or ["a"]))
        entry = header.get(victim, {})
        if edit == "name" and victim in header:
            header[draw(names)] = header.pop(victim)
        elif edit == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(
                st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.text(max_size=8), numbers)
            )
        elif edit == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.one_of(st.lists(numbers, max_size=4), numbers))
        elif edit == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = draw(st.lists(numbers, max_size=3))
        elif edit == "metadata":
            header["__metadata__"] = draw(
                st.dictionaries(st.text(max_size=5), numbers | st.text(), max_size=3)
            )
        elif edit == "length":
            declared = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 400)))
        elif edit == "utf8":
            raw_header = json.dumps(header).encode().replace(b'"a"', b'"\xff\xfe"', 1)
        elif edit == "duplicate":
            raw_header = (
                json.dumps(header).encode()[:-1]
                + b', "a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}'
            )
        elif edit == "body":
            cut = draw(st.integers(0, len(body)))
            body = body[:cut] + draw(st.binary(max_size=16))
        elif edit == "json":
            raw_header = draw(st.binary(max_size=64))
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + body


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz")
    assert cli("init", directory / "store").exit_code == 0
    return directory


@FUZZ
@given(data=hostile_safetensors())
def test_hostile_safetensors_is_refused_or_packed_exactly(scratch: Path, data: bytes) -> None:
    store, model, out = scratch / "store", scratch / "model.safetensors", scratch / "out.safetensors"
    model.write_bytes(data)
    before = store_state(store)
    with Repository.open(store) as repo, allocation_bound(8 * len(data) + SLACK):
        try:
            result = pack(repo, [model], ref="fuzz")
        except BlockstoreError as exc:
            refused_cleanly(exc)
            accepted = None
        else:
            accepted = result.snapshot_id
    if accepted is None:
        assert store_state(store) == before, "a refused pack wrote to the store"
        return
    with Repository.open(store) as repo:
        export(repo, accepted, out)
    assert out.read_bytes() == data, "an accepted file did not round-trip byte for byte"


# --- bundle reader -----------------------------------------------------------------------------------


def _fine_tuned(tensor: RawTensor, seed: int) -> RawTensor:
    """`tensor` (F32) with every weight moved a little: a v2 whose chunks pack as deltas."""
    values = np.frombuffer(tensor.data, np.float32)
    moved = values + np.random.default_rng(seed).normal(0, 2e-5, size=values.size).astype(np.float32)
    return RawTensor(tensor.dtype, tensor.shape, moved.astype(np.float32).tobytes())


@pytest.fixture(scope="module", params=["whole", "deltas"])
def bundle_case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, bytes]:
    """(template store at v1, the bytes of a valid v1 -> v2 bundle); with "deltas", v2 is v1 moved
    a little, so the bundle ships delta chunks (version 4)."""
    directory = tmp_path_factory.mktemp("bundle")
    weights = float_tensor((64, 64), 1)
    v1 = write_safetensors(directory / "v1.safetensors", {"w": weights, "n": float_tensor((64,), 2)})
    changed = _fine_tuned(weights, 3) if request.param == "deltas" else float_tensor((64, 64), 3)
    v2 = write_safetensors(directory / "v2.safetensors", {"w": changed, "n": float_tensor((64,), 2)})
    publisher, consumer = directory / "publisher", directory / "consumer"
    for store, versions in ((publisher, (v1, v2)), (consumer, (v1,))):
        assert cli("init", store, "--chunk-size", 4096).exit_code == 0
        for version in versions:
            assert cli("pack", version, "--store", store).exit_code == 0
    with Repository.open(publisher) as repo:
        first = repo.store.reflog("main")[0].new.hex()
    bundle = directory / "update.bsp"
    assert cli("diff", publisher, first, "main", "-o", bundle).exit_code == 0
    data = bundle.read_bytes()
    assert (_PREAMBLE.unpack(data[: _PREAMBLE.size])[1] == DELTA_VERSION) == (request.param == "deltas")
    return consumer, _blob(data, "valid")


def _sections(data: bytes) -> tuple[tuple, dict, bytes, bytes]:
    """(preamble fields, header, target snapshot, chunk values) of an unsigned bundle."""
    preamble = _PREAMBLE.unpack(data[: _PREAMBLE.size])
    header_end = _PREAMBLE.size + preamble[3]
    header = msgpack.unpackb(data[_PREAMBLE.size : header_end], raw=False)
    snapshot_end = header_end + header["snapshot_len"]
    return preamble, header, data[header_end:snapshot_end], data[snapshot_end:-DIGEST_SIZE]


def _sealed(
    preamble: tuple, header: dict, snapshot: bytes, values: bytes, header_len: int | None = None
) -> bytes:
    """Reassemble a bundle with a correct footer: the hostile writer's view, not a damaged file."""
    header_bytes = msgpack.packb(header, use_bin_type=True)
    magic, version, flags, _ = preamble
    length = len(header_bytes) if header_len is None else header_len
    body = _PREAMBLE.pack(magic, version, flags, length) + header_bytes + snapshot + values
    return body + digest(body)


class Blob(bytes):
    """Bytes that print as their size and how they were made (a bundle's repr is kilobytes)."""

    label = ""

    def __repr__(self) -> str:
        return f"<{len(self)}-byte bundle, {self.label}>"


def _blob(data: bytes, label: str) -> Blob:
    blob = Blob(data)
    blob.label = label
    return blob


msgpack_ints = st.one_of(
    st.integers(-(2**63), 2**64 - 1), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -1, 0])
)
header_values = st.one_of(
    msgpack_ints,
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.binary(max_size=40),
    st.lists(st.one_of(st.binary(max_size=20), msgpack_ints), max_size=4),
)


@st.composite
def hostile_bundles(draw: st.DrawFn, valid: bytes) -> Blob:
    edit = draw(st.sampled_from(["bytes", "truncate", "append", "field", "chunks", "snapshot", "preamble"]))
    return _blob(draw(_edited_bundle(valid, edit)), edit)


@st.composite
def _edited_bundle(draw: st.DrawFn, valid: bytes, edit: str) -> bytes:
    preamble, header, snapshot, values = _sections(valid)
    if edit == "bytes":
        at = draw(st.integers(0, len(valid) - 1))
        return valid[:at] + bytes([valid[at] ^ draw(st.integers(1, 255))]) + valid[at + 1 :]
    if edit == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if edit == "append":
        return valid + draw(st.binary(min_size=1, max_size=64))
    if edit == "field":
        header[draw(st.sampled_from([*header, "extra"]))] = draw(header_values)
    elif edit == "chunks":
        chunks = header["chunks"]
        index = draw(st.integers(0, max(0, len(chunks) - 1)))
        if chunks:
            chunks[index][draw(st.integers(0, 2))] = draw(header_values)
        chunks.append(draw(st.lists(header_values, max_size=4)))
    elif edit == "snapshot":
        # A different target snapshot under a matching id: it passes the hash, then must parse.
        at = draw(st.integers(0, len(snapshot) - 1))
        snapshot = snapshot[:at] + draw(st.binary(max_size=8)) + snapshot[at + 1 :]
        header["target"], header["snapshot_len"] = digest(snapshot), len(snapshot)
    elif edit == "preamble":
        preamble = (MAGIC, draw(st.integers(0, 3)), draw(st.integers(0, 3)), 0)
        return _sealed(preamble, header, snapshot, values, draw(st.integers(0, 2**64 - 1)))
    return _sealed(preamble, header, snapshot, values)


@FUZZ
@given(data=st.data())
def test_hostile_bundle_is_refused_without_a_write(
    bundle_case: tuple[Path, bytes], data: st.DataObject
) -> None:
    template, valid = bundle_case
    hostile = data.draw(hostile_bundles(valid))
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        shutil.copytree(template, store)
        bundle = Path(scratch) / "update.bsp"
        bundle.write_bytes(hostile)
        before = store_state(store)
        with Repository.open(store) as repo, allocation_bound(4 * len(hostile) + SLACK):
            try:
                apply(repo, bundle)
            except BlockstoreError as exc:
                refused_cleanly(exc)
                refused = True
            else:
                refused = False
        if refused:
            assert store_state(store) == before, "a refused bundle wrote to the store"
            return
        # Accepted (an unknown header key, a re-hashed target with another message, ...): then the
        # store holds exactly the snapshot the bundle names, intact.
        with Repository.open(store) as repo:
            assert repo.resolve("main") == read_bundle(bundle).target and verify(repo, deep=True).clean


# --- chunk decoder -----------------------------------------------------------------------------------


def _envelope(codec_id: object, params: object, payload: object) -> bytes:
    return msgpack.packb([codec_id, params, payload], use_bin_type=True)


def _framed_envelope(codec_id: object, params: object, payload: bytes) -> bytes:
    return framing.frame([codec_id, params], [payload])


def _lying_frame(fields: object, lengths: list[int], tail: bytes) -> bytes:
    """A framed value whose part lengths need not match the bytes that follow."""
    header = msgpack.packb([fields, lengths], use_bin_type=True)
    return struct.pack("<BI", framing.MARK, len(header)) + header + tail


def _zstd_frame_claiming(size: int, window_log: int) -> bytes:
    """A zstd frame header that declares `size` content bytes and a 2**window_log window, followed
    by one raw block of a few bytes: decoders that trust the header allocate `size` up front."""
    descriptor = 0b11000000  # 8-byte frame content size, no single-segment, no checksum, no dict
    window = (window_log - 10) << 3
    block = struct.pack("<I", (4 << 3) | 0 | 1)[:3]  # last block, raw, 4 bytes
    return b"\x28\xb5\x2f\xfd" + bytes([descriptor, window]) + struct.pack("<Q", size) + block + b"abcd"


real_frame = zstandard.ZstdCompressor().compress(np.arange(4096, dtype=np.float32).tobytes())
codec_ids = st.sampled_from([*CODECS, "lzma", ""])  # every registered codec, lossy ones included
params = st.one_of(
    st.fixed_dictionaries({"itemsize": st.integers(-2, 9), "level": st.integers(-5, 30)}),
    st.fixed_dictionaries({"width": st.integers(-2, 9), "level": st.integers(-5, 30)}),
    st.dictionaries(st.text(max_size=10), header_values, max_size=4),
    header_values,
)
payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(_zstd_frame_claiming, st.integers(0, 2**63), st.integers(10, 41)),
    st.integers(0, len(real_frame)).map(lambda cut: real_frame[:cut]),
    st.binary(min_size=1, max_size=32).map(lambda tail: real_frame + tail),
    st.lists(st.tuples(st.integers(-1, 4), st.binary(max_size=64)), max_size=9).map(
        lambda planes: msgpack.packb([list(p) for p in planes], use_bin_type=True)
    ),
    st.lists(st.tuples(st.integers(-1, 4), st.binary(max_size=64)), max_size=9).map(
        lambda planes: framing.frame([mode for mode, _ in planes], [plane for _, plane in planes])
    ),
    st.builds(
        _lying_frame,
        header_values,
        st.lists(st.integers(0, 2**40), max_size=9),
        st.binary(max_size=64),
    ),
)
nibbles_payloads = st.builds(
    lambda counts, bitmap, nibbles, exceptions, extra: framing.frame(
        counts,
        [
            zstandard.ZstdCompressor().compress(bitmap),
            zstandard.ZstdCompressor().compress(nibbles),
            exceptions,
            *extra,
        ],
    ),
    st.one_of(st.lists(st.integers(-1, 300), min_size=2, max_size=2), header_values),
    st.binary(max_size=40),
    st.binary(max_size=200),
    st.one_of(
        payloads,
        st.builds(
            lambda raw: ByteGroupZstd(2).encode(memoryview(raw)),
            st.binary(max_size=64).map(lambda b: b[: len(b) // 2 * 2]),
        ),
    ),
    st.lists(st.binary(max_size=8), max_size=1),
)
"""`nibbles+zstd` payloads (FORMAT.md §1) with every part the attacker's: counts that lie, a bitmap
and nibbles of any length and content, exceptions of any kind."""
nibbles_params = st.fixed_dictionaries({"width": st.sampled_from([1, 2, 4, 8]), "level": st.just(3)})
stored_values: st.SearchStrategy[bytes] = st.one_of(
    st.builds(_framed_envelope, st.just("nibbles+zstd"), nibbles_params, nibbles_payloads),
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda tail: bytes([framing.MARK]) + tail),
    st.builds(_envelope, codec_ids, params, payloads),
    st.builds(_framed_envelope, codec_ids, params, payloads),
    st.builds(_lying_frame, header_values, st.lists(st.integers(0, 2**40), max_size=3), payloads),
)
sizes: st.SearchStrategy[int] = st.one_of(st.integers(1, 64 << 10), st.just(MAX_CHUNK_SIZE))


@pytest.fixture(scope="module")
def warm_decoders() -> None:
    """Decode one valid chunk per codec first: first-use imports (torch, in the lossy decoders),
    per-thread contexts and the byte-plane scratch allocate memory the bound must not charge to
    the input."""
    raw = memoryview(np.zeros(4096, dtype=np.float32).tobytes())  # every plane zstd: the plane scratch too
    lossy = [lossy_codec(tier, "F32", 64) for tier in lossy_ids()]
    for codec in (Raw(), Zstd(), ByteGroupZstd(itemsize=4), Nibbles(width=4), *lossy):
        with contextlib.suppress(ChunkCorrupt):  # right bytes, wrong key: decoded all the same
            decode_chunk(b"\x00" * 16, chunk_value(codec, codec.encode(raw)), len(raw))


delta_params = st.one_of(
    st.fixed_dictionaries(
        {
            "base": st.one_of(st.binary(min_size=16, max_size=16), header_values),
            "width": st.one_of(st.sampled_from([1, 2, 4, 8]), header_values),
            "codec": st.one_of(codec_ids, st.just("delta"), header_values),
            "params": params,
        }
    ),
    params,
)
delta_values: st.SearchStrategy[bytes] = st.one_of(
    st.builds(_framed_envelope, st.just("delta"), delta_params, payloads),
    st.builds(
        _framed_envelope,
        st.just("delta"),
        st.fixed_dictionaries(
            {
                "base": st.binary(min_size=16, max_size=16),
                "width": st.sampled_from([1, 2, 4, 8]),
                "codec": st.just("nibbles+zstd"),
                "params": nibbles_params,
            }
        ),
        nibbles_payloads,
    ),
)


@FUZZ
@given(value=delta_values, raw_len=sizes, base_len=sizes)
@pytest.mark.usefixtures("warm_decoders")
def test_hostile_delta_values_are_corrupt_within_bounds(value: bytes, raw_len: int, base_len: int) -> None:
    """A delta chunk's envelope, difference and base are all the attacker's: still only damage."""
    base = np.random.default_rng(raw_len).bytes(base_len)
    # The output, the difference's frames and planes, the base and numpy's temporaries: about 4x.
    with (
        allocation_bound(4 * raw_len + base_len + 4 * len(value) + SLACK),
        pytest.raises(ChunkCorrupt) as caught,
    ):
        decode_chunk(b"\x00" * 16, value, raw_len, base=lambda key, out, difference=None: base)
    refused_cleanly(caught.value)


@FUZZ
@given(value=stored_values, raw_len=sizes)
@pytest.mark.usefixtures("warm_decoders")
def test_hostile_chunk_values_are_corrupt_within_bounds(value: bytes, raw_len: int) -> None:
    # A valid lossy chunk needs its output, its decompressed frames and a float copy: about 3x.
    with allocation_bound(3 * raw_len + 4 * len(value) + SLACK), pytest.raises(ChunkCorrupt) as caught:
        decode_chunk(b"\x00" * 16, value, raw_len)
    refused_cleanly(caught.value)

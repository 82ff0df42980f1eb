"""The nibbles codec a delta's difference is stored with: exact at every width, the compiled pass and
numpy give the same bytes and the same refusals, and a delta picks it only where it pays."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockstore.codecs import DecodeError, Nibbles, Raw, Zstd, framing, planes, stored_codec
from blockstore.codecs import delta as deltas
from blockstore.codecs import nibbles as nibbles_module
from blockstore.codecs.lossless import ByteGroupZstd
from blockstore.core.chunks import (
    decode_base_onto,
    decode_chunk,
    decode_chunk_into,
    delta_header,
    delta_value,
    encode_chunk,
)
from blockstore.core.hashing import chunk_key, strong_digest
from blockstore.errors import ChunkCorrupt, ChunkMissing

from .helpers import FUZZ_EXAMPLES

WIDTHS = nibbles_module.WIDTHS
UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

PASSES = [pytest.param(None, id="numpy")]
if planes._compiled is not None:
    PASSES += [
        pytest.param(level, id=f"compiled-{name}")
        for level, name in ((2, "avx512"), (1, "avx2"), (0, "portable"))
        if level <= planes._compiled.best_vectors()
    ]
LEVELS = [param.values[0] for param in PASSES]
"""None: numpy's pass; 0-2: the compiled one with the vectors it may use (`_planes.vectors`)."""


@pytest.fixture(params=PASSES)
def compiled(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Runs a test with the compiled pass at every vector level this CPU has (AVX-512, AVX2, the
    portable loops of any other CPU) and with numpy's (the module is optional)."""
    with _level(request.param):
        yield request.param is not None


@contextmanager
def _level(level: int | None) -> Iterator[None]:
    module = planes._compiled
    if level is None:
        planes._compiled = None
    was = module.vectors(level) if module is not None and level is not None else None
    try:
        yield
    finally:
        planes._compiled = module
        if module is not None and was is not None:
            module.vectors(was)


def _small_values(width: int, count: int, seed: int) -> bytes:
    """Mostly 0-3, some up to 40, a few at the top of the width: every path of the codec."""
    rng = np.random.default_rng(seed)
    top = (1 << (8 * width)) - 1
    values = np.minimum(rng.geometric(0.6, count) - 1, min(top, 255)).astype(UNSIGNED[width])
    middling = rng.random(count) < 0.03
    values[middling] = rng.integers(15, 41, int(middling.sum())).astype(UNSIGNED[width])
    values[rng.random(count) < 0.01] = top
    return values.tobytes()


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("count", [0, 1, 2, 15, 16, 17, 31, 33, 4099])
def test_values_round_trip_at_every_width_and_count(compiled: bool, width: int, count: int) -> None:
    raw = _small_values(width, count, seed=count)
    codec = Nibbles(width)
    out = bytearray(len(raw) + 1)
    codec.decode_into(codec.encode(memoryview(raw)), memoryview(out)[1:])  # also into unaligned memory
    assert bytes(out[1:]) == raw


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.sampled_from(WIDTHS), st.integers(0, 80), st.data())
def test_any_bytes_round_trip_and_restore_onto_a_base(width: int, count: int, data: st.DataObject) -> None:
    raw = data.draw(st.binary(min_size=count * width, max_size=count * width))
    base = data.draw(st.binary(min_size=count * width, max_size=count * width))
    codec = Nibbles(width)
    folded = deltas.difference(raw, base, width)
    payload = codec.encode(memoryview(folded))
    for level in LEVELS:
        with _level(level):
            out = bytearray(len(raw))
            codec.decode_into(payload, memoryview(out))
            assert bytes(out) == folded
            codec.restore_into(payload, memoryview(out), base)
            assert bytes(out) == raw


@pytest.mark.parametrize("width", WIDTHS)
def test_a_difference_restores_onto_its_base_in_one_pass(compiled: bool, width: int) -> None:
    rng = np.random.default_rng(width)
    base = rng.integers(0, 256, 4096 * width, dtype=np.uint8).tobytes()
    change = rng.integers(-3, 4, 4096).astype(UNSIGNED[width])
    change[::97] = UNSIGNED[width](1 << (8 * width - 1))  # a sign flip: an exception at full width
    raw = (np.frombuffer(base, UNSIGNED[width]) + change).tobytes()
    value = delta_value(memoryview(raw), chunk_key(base), base, width, 3)
    header = delta_header(value)
    assert header is not None and header.codec == Nibbles(width, 3)
    assert (
        bytes(decode_chunk(chunk_key(raw), value, len(raw), base=lambda key, out, difference=None: base))
        == raw
    )


def test_a_delta_of_large_changes_is_byte_grouped_instead() -> None:
    """A float32 fine-tune moves weights by thousands of units in the last place: nearly every value
    would be an exception, so the difference is stored as byte planes."""
    rng = np.random.default_rng(5)
    base = (rng.standard_normal(8192) * 0.02).astype(np.float32)
    raw = (base + rng.standard_normal(8192).astype(np.float32) * 2e-5).astype(np.float32)
    value = delta_value(memoryview(raw.tobytes()), chunk_key(base.tobytes()), base.tobytes(), 4, 3)
    header = delta_header(value)
    assert header is not None and header.codec == ByteGroupZstd(4, 3)
    decoded = decode_chunk(
        chunk_key(raw.tobytes()), value, raw.nbytes, base=lambda key, out, difference=None: base.tobytes()
    )
    assert bytes(decoded) == raw.tobytes()


def test_deltas_stored_with_byte_planes_still_decode() -> None:
    """Stores written before nibbles held byte-grouped differences only: they read the same."""
    rng = np.random.default_rng(6)
    base = rng.integers(0, 1 << 16, 2048, dtype=np.uint16)
    raw = (base + rng.integers(0, 3, 2048, dtype=np.uint16)).tobytes()
    inner = ByteGroupZstd(2, 3)
    payload = inner.encode(memoryview(deltas.difference(raw, base.tobytes(), 2)))
    params = {
        "base": chunk_key(base.tobytes()),
        "width": 2,
        "codec": inner.id,
        "params": {"itemsize": 2, "level": 3, "split_sign": False},
    }
    value = framing.frame(["delta", params], [payload])
    assert (
        bytes(
            decode_chunk(
                chunk_key(raw), value, len(raw), base=lambda key, out, difference=None: base.tobytes()
            )
        )
        == raw
    )


def _payload(fields: object, bitmap: bytes, nibbles: bytes, exceptions: bytes = b"") -> bytes:
    import zstandard

    compress = zstandard.ZstdCompressor().compress
    return framing.frame(fields, [compress(bitmap), compress(nibbles), exceptions])


ONE_EXCEPTION = ByteGroupZstd(2).encode(memoryview(b"\x01\x00"))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_payload([2, 1], b"\x03", b"\x00", ONE_EXCEPTION), "exactly the 1 exc"),
        (_payload([2, 0], b"\x03", b"\x0f"), "exactly the 0 exceptions"),  # marks one, counts none
        (_payload([2, 0], b"\x05", b"\x00\x00"), "zstd frame declares"),  # 4 values' nibbles for 2
        (_payload([2, 0], b"\x07", b"\x00"), "bitmap does not mark exactly the 2"),  # marks 3
        (_payload([3, 0], b"\x13", b"\x00\x00"), "past the last one"),  # bit 4 of 4 elements
        (_payload([2, 0], b"\x03\x00", b"\x00"), "zstd frame declares"),  # 16 elements' bitmap
        (_payload([9, 0], b"\x03", b"\x00"), "9 nonzero values for 4 elements"),
        (_payload([2, 3], b"\x03", b"\x00"), "3 exceptions for 2 nonzero"),
        (_payload(["x", 0], b"\x03", b"\x00"), "nonzero count"),
        (_payload([2], b"\x03", b"\x00"), "nonzero count"),
        (_payload([2, 0], b"\x03", b"\x00", b"extra"), "does not count"),
        (framing.frame([2, 0], [b"", b""]), "nonzero count"),
        (b"not framed", "nibbles payload"),
    ],
    ids=[
        "unmarked",
        "uncounted",
        "long",
        "overmarked",
        "marked-past-end",
        "long-bitmap",
        "overcounted",
        "exceptions-overcounted",
        "uncountable",
        "one-field",
        "extra",
        "two-parts",
        "unframed",
    ],
)
def test_hostile_payloads_are_refused_never_misread(compiled: bool, payload: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        Nibbles(2).decode_into(payload, memoryview(bytearray(8)))


def test_a_padding_nibble_that_is_not_zero_is_refused(compiled: bool) -> None:
    with pytest.raises(DecodeError, match="padding nibble"):
        Nibbles(1).decode_into(_payload([3, 0], b"\x07", b"\x00\x10"), memoryview(bytearray(3)))


@pytest.mark.parametrize("width", WIDTHS)
def test_every_vector_level_reads_a_bitmap_of_any_density_alike(width: int) -> None:
    """The vector loops take the bitmap 16 elements at a time and the values at any offset: runs of
    zeros, runs of nonzeros, blocks ending mid-step and exceptions at block edges give the bytes of
    the portable loop and of numpy."""
    rng = np.random.default_rng(width)
    count = 3 * 4096 + 23
    values = rng.integers(1, 20, count).astype(UNSIGNED[width])
    density = np.repeat(rng.random(count // 64 + 1), 64)[:count]
    values[rng.random(count) > density] = 0
    values[4095:4098] = 40  # exceptions across a block edge
    raw = values.tobytes()
    base = rng.integers(0, 256, len(raw), dtype=np.uint8).tobytes()
    codec = Nibbles(width)
    payload = codec.encode(memoryview(raw))
    results = set()
    for level in LEVELS:
        with _level(level):
            out = bytearray(len(raw))
            codec.restore_into(payload, memoryview(out), base)
            results.add(bytes(out))
            in_place = bytearray(base)
            codec.restore_into(payload, memoryview(in_place), memoryview(in_place))
            results.add(bytes(in_place))
    assert len(results) == 1
    sign = (values & 1).astype(UNSIGNED[width])
    expected = ((values >> 1) ^ (np.zeros_like(sign) - sign)) + np.frombuffer(base, UNSIGNED[width])
    assert results == {expected.tobytes()}


def test_a_stored_nibbles_codec_is_rebuilt_from_its_params() -> None:
    assert stored_codec("nibbles+zstd", {"width": 8, "level": 5}) == Nibbles(8, 5)
    with pytest.raises(Exception, match="width 3"):
        Nibbles(3)


@pytest.mark.parametrize("changes", ["small", "large"])
def test_a_base_decoded_into_the_deltas_own_buffer_is_added_in_place(compiled: bool, changes: str) -> None:
    """The store's base reader decodes the base where the delta goes (`BaseReader`): the difference
    is then added in place, for nibbles and for byte-grouped differences alike."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 1 << 16, 5000, dtype=np.uint16)
    step = rng.integers(-2, 3, 5000) if changes == "small" else rng.integers(-3000, 3000, 5000)
    raw = (base + step.astype(np.uint16)).tobytes()
    value = delta_value(memoryview(raw), chunk_key(base.tobytes()), base.tobytes(), 2, 3)
    header = delta_header(value)
    assert header is not None and type(header.codec) is (Nibbles if changes == "small" else ByteGroupZstd)

    def into_out(key: bytes, out: memoryview, difference: object = None) -> memoryview:
        out[:] = base.tobytes()
        return out

    assert bytes(decode_chunk(chunk_key(raw), value, len(raw), base=into_out)) == raw


def test_a_base_that_overlaps_the_output_is_refused() -> None:
    if planes._compiled is None:
        pytest.skip("blockstore._planes is not built here")
    payload = Nibbles(2).encode(memoryview(bytes(64)))
    memory = memoryview(bytearray(80))
    with pytest.raises(DecodeError, match="overlaps"):
        Nibbles(2).restore_into(payload, memory[:64], memory[8:72])


def test_a_chunk_beyond_the_kept_scratch_decodes_through_a_buffer_of_its_own() -> None:
    count = 8 * nibbles_module._KEPT_SCRATCH + 34  # the bitmap: just over the kept buffer's size
    raw = np.zeros(count, np.uint8)
    raw[::1001] = 200  # exceptions
    raw[5::7] = 3
    codec = Nibbles(1)
    out = bytearray(count)
    codec.decode_into(codec.encode(memoryview(raw.tobytes())), memoryview(out))
    assert out == raw.tobytes()
    for part in nibbles_module._PARTS:
        assert len(nibbles_module._local.__dict__.get(part, b"")) <= nibbles_module._KEPT_SCRATCH


def _fused_reader(stored: dict[bytes, bytes]):
    """A `BaseReader` like the store's: given the delta's difference, it decodes the base's stored
    value with the difference added (unchecked); otherwise it decodes the base, checked."""

    def read(key: bytes, out: memoryview, difference: object = None) -> memoryview | None:
        if key not in stored:
            raise ChunkMissing(key.hex())
        if difference is not None:
            decode_base_onto(key, stored[key], out, difference)  # type: ignore[arg-type]
            return None
        decode_chunk_into(key, stored[key], out)
        return out

    return read


@pytest.mark.parametrize(
    ("dtype", "width", "base_codec"),
    [
        ("BF16", 2, ByteGroupZstd(2, 3, True)),
        ("F16", 2, ByteGroupZstd(2, 3, True)),
        ("F32", 4, ByteGroupZstd(4, 3, True)),
        ("I64", 8, ByteGroupZstd(8, 3)),
        ("U8", 1, ByteGroupZstd(1, 3)),
        ("F32-zstd", 4, Zstd(3)),
        ("F32-raw", 4, Raw()),
    ],
)
def test_a_base_joined_with_its_difference_in_one_pass_gives_the_chunk(
    compiled: bool, dtype: str, width: int, base_codec: object
) -> None:
    rng = np.random.default_rng(width)
    base = rng.integers(0, 256, (4096 + 17) * width, dtype=np.uint8).tobytes()
    change = rng.integers(-3, 4, 4096 + 17).astype(UNSIGNED[width])
    change[::97] = UNSIGNED[width](1 << (8 * width - 1))
    raw = (np.frombuffer(base, UNSIGNED[width]) + change).tobytes()
    base_key = chunk_key(base)
    value = delta_value(memoryview(raw), base_key, base, width, 3)
    stored = {base_key: encode_chunk(base_codec, memoryview(base))}  # type: ignore[arg-type]
    assert (
        bytes(decode_chunk(chunk_key(raw), value, len(raw), strong_digest(raw), _fused_reader(stored))) == raw
    )


def test_a_damaged_base_under_a_fused_delta_is_named() -> None:
    rng = np.random.default_rng(3)
    bf16 = (rng.standard_normal(2048) * 0.02).astype(np.float32).view(np.uint16)[1::2]
    base = bf16.copy().tobytes()
    raw = (np.frombuffer(base, np.uint16) + rng.integers(0, 2, 2048, dtype=np.uint16)).tobytes()
    base_key = chunk_key(base)
    value = delta_value(memoryview(raw), base_key, base, 2, 3)
    other = np.frombuffer(base, np.uint16).copy()
    other[7] ^= 0x40
    wrong = {
        base_key: encode_chunk(ByteGroupZstd(2, 3, True), memoryview(other.tobytes()))
    }  # decodes, wrongly
    with pytest.raises(ChunkCorrupt, match=f"its base: chunk {base_key.hex()}"):
        decode_chunk(chunk_key(raw), value, len(raw), strong_digest(raw), _fused_reader(wrong))
    broken = {base_key: encode_chunk(ByteGroupZstd(2, 3, True), memoryview(base))[:-9]}  # does not decode
    with pytest.raises(ChunkCorrupt, match=f"its base: chunk {base_key.hex()}"):
        decode_chunk(chunk_key(raw), value, len(raw), strong_digest(raw), _fused_reader(broken))
    with pytest.raises(ChunkCorrupt, match="its base"):
        decode_chunk(chunk_key(raw), value, len(raw), strong_digest(raw), _fused_reader({}))


def test_a_damaged_difference_over_a_sound_base_is_the_deltas_damage() -> None:
    rng = np.random.default_rng(4)
    base = rng.integers(0, 1 << 16, 2048, dtype=np.uint16).tobytes()
    raw = (np.frombuffer(base, np.uint16) + rng.integers(0, 2, 2048, dtype=np.uint16)).tobytes()
    base_key = chunk_key(base)
    value = bytearray(delta_value(memoryview(raw), base_key, base, 2, 3))
    value[-40] ^= 0x01  # inside the nibbles' zstd frame or the exceptions
    stored = {base_key: encode_chunk(ByteGroupZstd(2, 3), memoryview(base))}
    with pytest.raises(ChunkCorrupt) as caught:
        decode_chunk(chunk_key(raw), bytes(value), len(raw), strong_digest(raw), _fused_reader(stored))
    assert "its base" not in str(caught.value) and chunk_key(raw).hex() in str(caught.value)


def test_a_difference_decoded_while_another_waits_for_its_base_keeps_its_parts() -> None:
    """A copy re-roots a delta by reading its base, itself a delta in that store: the inner decode
    must not reuse the outer difference's buffers (it did: the outer then saw the inner's nibbles)."""
    rng = np.random.default_rng(5)
    root = rng.integers(0, 1 << 16, 3000, dtype=np.uint16)
    middle = (root + rng.integers(0, 3, 3000, dtype=np.uint16)).tobytes()
    raw = (np.frombuffer(middle, np.uint16) + rng.integers(0, 3, 3000, dtype=np.uint16)).tobytes()
    inner = delta_value(memoryview(middle), chunk_key(root.tobytes()), root.tobytes(), 2, 3)
    outer = delta_value(memoryview(raw), chunk_key(middle), middle, 2, 3)

    def base(key: bytes, out: memoryview, difference: object = None) -> bytearray:  # decodes a delta itself
        return decode_chunk(key, inner, len(out), base=lambda k, o, d=None: root.tobytes())

    assert bytes(decode_chunk(chunk_key(raw), outer, len(raw), base=base)) == raw

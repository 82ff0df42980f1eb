"""Byte planes: the layout stored chunks depend on, and exact round trips at every item width."""

from __future__ import annotations

import shutil
import sysconfig

import numpy as np
import pytest

from blockstore.codecs import ByteGroupZstd, planes, stored_codec
from blockstore.errors import InvalidArgument

WIDTHS = [(itemsize, split_sign) for itemsize in planes.ITEMSIZES for split_sign in (False, True)]
WIDTHS.remove((1, True))

JOINS = [pytest.param(planes.join_numpy, id="numpy")]
if planes._compiled is not None:
    JOINS.append(pytest.param(planes._compiled.join, id="compiled"))


def _raw(itemsize: int, count: int = 4099) -> bytes:
    return np.random.default_rng(itemsize).integers(0, 256, count * itemsize, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("join", JOINS)
@pytest.mark.parametrize(("itemsize", "split_sign"), WIDTHS)
def test_split_then_join_is_exact(join, itemsize: int, split_sign: bool) -> None:
    raw = _raw(itemsize)
    out = bytearray(len(raw) + 1)
    join(planes.split(memoryview(raw), itemsize, split_sign), memoryview(out)[1:], split_sign)
    assert bytes(out[1:]) == raw  # also into an unaligned buffer, as a chunk inside a tensor may be


@pytest.mark.parametrize("join", JOINS)
def test_join_takes_planes_as_any_buffer(join) -> None:
    raw = _raw(2)
    split = planes.split(memoryview(raw), 2, True)
    for kinds in ([bytes(split[0]), bytearray(split[1])], [memoryview(split[0]), split[1]]):
        out = bytearray(len(raw))
        join(kinds, memoryview(out), True)
        assert bytes(out) == raw


@pytest.mark.parametrize("join", JOINS)
def test_join_refuses_planes_that_do_not_fit_the_output(join) -> None:
    raw = _raw(4)
    split = planes.split(memoryview(raw), 4, False)
    with pytest.raises(ValueError):
        join([*split[:3], split[3][:-1]], memoryview(bytearray(len(raw))), False)
    with pytest.raises(ValueError):
        join(split, memoryview(bytearray(len(raw) + 4)), False)


def test_compiled_join_refuses_what_no_item_width_means() -> None:
    if planes._compiled is None:
        pytest.skip("blockstore._planes is not built here")
    with pytest.raises(ValueError, match="3 planes"):
        planes._compiled.join([b"a", b"b", b"c"], bytearray(3), False)
    with pytest.raises(ValueError, match="split_sign needs"):
        planes._compiled.join([b"a"], bytearray(1), True)
    with pytest.raises(TypeError):
        planes._compiled.join([b"ab"], b"ro", False)  # the output must be writable


def test_compiled_join_is_built_where_a_compiler_is() -> None:
    """The extension is optional at install, so a broken build would go unnoticed but for this."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here: blockstore joins planes with numpy")
    assert planes._compiled is not None, "blockstore._planes was not built: reinstall and read the build log"


@pytest.mark.parametrize("itemsize", planes.ITEMSIZES)
def test_plane_i_holds_byte_i_of_every_item(itemsize: int) -> None:
    raw = _raw(itemsize)
    grid = np.frombuffer(raw, np.uint8).reshape(-1, itemsize)
    for index, plane in enumerate(planes.split(memoryview(raw), itemsize, split_sign=False)):
        assert plane.tobytes() == grid[:, index].tobytes()


@pytest.mark.parametrize(
    ("dtype", "fields", "expected"),
    [
        # sign 1, exponent 0x85, mantissa 0x35 -> exponent plane 0x85, sign + mantissa plane 0xB5
        ("<u2", (1 << 15) | (0x85 << 7) | 0x35, [0xB5, 0x85]),
        # sign 1, exponent 0x7F, mantissa 0x123456 -> low bytes as they are, then 0x80|0x12, 0x7F
        ("<u4", (1 << 31) | (0x7F << 23) | 0x123456, [0x56, 0x34, 0x92, 0x7F]),
        # sign 1, exponent 0x3F4 (bit 55, the top byte's old lowest bit, is 0), mantissa 0xA_BCDE_F012_3456
        (
            "<u8",
            (1 << 63) | (0x3F4 << 52) | 0xA_BCDE_F012_3456,
            [0x56, 0x34, 0x12, 0xF0, 0xDE, 0xBC, 0xCA, 0x7E],
        ),
    ],
)
def test_sign_split_layout_is_what_stored_chunks_hold(dtype: str, fields: int, expected: list[int]) -> None:
    """Pinned by hand, not by a second implementation: chunks packed by every earlier release
    decode only if these bytes never move."""
    raw = np.array([fields, 0], dtype=dtype).tobytes()
    split = planes.split(memoryview(raw), len(expected), split_sign=True)
    assert [int(plane[0]) for plane in split] == expected
    assert [int(plane[1]) for plane in split] == [0] * len(expected)


def test_numpy_join_reuses_its_scratch_across_sizes() -> None:
    big, small = _raw(4, 70_000), _raw(4, 3)
    for raw in (big, small, big):
        out = bytearray(len(raw))
        planes.join_numpy(planes.split(memoryview(raw), 4, True), memoryview(out), True)
        assert bytes(out) == raw


def test_item_width_without_a_word_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="itemsize 3 is not one of 1, 2, 4, 8"):
        ByteGroupZstd(itemsize=3)


def test_stored_codecs_are_remembered_by_value_and_type() -> None:
    first = stored_codec("bytegroup+zstd", {"itemsize": 2, "level": 3, "split_sign": True})
    assert stored_codec("bytegroup+zstd", {"itemsize": 2, "level": 3, "split_sign": True}) is first
    assert first == ByteGroupZstd(itemsize=2, level=3, split_sign=True)
    lookalike = stored_codec("bytegroup+zstd", {"itemsize": 2.0, "level": 3, "split_sign": True})
    assert lookalike is not first and type(lookalike.itemsize) is float  # 2.0 == 2, but not the same
    with pytest.raises(InvalidArgument, match=r"itemsize \[2\] is not one of"):  # unhashable: as usual
        stored_codec("bytegroup+zstd", {"itemsize": [2]})


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy-fallback"])
@pytest.mark.parametrize(("itemsize", "split_sign"), WIDTHS)
def test_codec_decodes_the_same_bytes_with_or_without_the_compiled_join(
    monkeypatch: pytest.MonkeyPatch, compiled: bool, itemsize: int, split_sign: bool
) -> None:
    if compiled and planes._compiled is None:
        pytest.skip("blockstore._planes is not built here")
    if not compiled:
        monkeypatch.setattr(planes, "_compiled", None)  # as on a machine without a C compiler
    raw = _raw(itemsize, 70_000)
    codec = ByteGroupZstd(itemsize=itemsize, split_sign=split_sign)
    out = bytearray(len(raw))
    codec.decode_into(codec.encode(memoryview(raw)), memoryview(out))
    assert bytes(out) == raw

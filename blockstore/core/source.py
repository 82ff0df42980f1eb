"""A strict safetensors reader and input discovery (what `pack` reads).

The header is validated completely before any tensor byte is touched, following the checks of the
reference implementation and a little stricter: a size prefix within the file and under 100 MB, a
UTF-8 JSON object with no duplicate keys, known dtypes, offsets that are contiguous from zero, in
file, consistent with dtype and shape, and that cover the data region exactly. Data is then read in
ranges (pread), so a 10 GB file never needs 10 GB of memory. Pickle-based checkpoints are refused,
never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockstore.core.dtypes import DTYPE_BITS, nbytes_of
from blockstore.core.manifests import is_count, shape_problem, unsafe_character
from blockstore.errors import InvalidArgument, InvalidSafetensors, SourceChanged, UnsupportedInput

MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
"""Small files kept verbatim in a snapshot next to the weights: the model's config (the runtime
builds models from it) and its tokenizer, so that a store alone is enough to serve the model
(`blockstore model-dir` writes them out for an engine)."""
MAX_SIDE_FILE_BYTES = 64 << 20
"""The largest tokenizer.json files of current models are a few tens of MB."""
MAX_INDEX_BYTES = 64 << 20
"""A shard index lists one line per tensor; even a 100,000-tensor model's index is a few MB."""
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; offsets are relative to the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a file from another without reading it: which file (device and
    inode), how long, and when its contents last changed. A writer that overwrites, truncates or
    appends moves `size` or `mtime_ns`; a file replaced by rename moves the inode."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, handle: int) -> FileIdentity:
        found = os.fstat(handle)
        return cls(found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)

    def differences(self, other: FileIdentity) -> str:
        """'' when the same, else what moved, for a one-line refusal."""
        moved = []
        if (self.device, self.inode) != (other.device, other.inode):
            moved.append("replaced by another file")
        if self.size != other.size:
            moved.append(f"size {self.size} -> {other.size} bytes")
        if self.mtime_ns != other.mtime_ns:
            moved.append("modified")
        return ", ".join(moved)


@dataclass(frozen=True)
class SafetensorsFile:
    """A validated safetensors file: the header bytes verbatim and its tensors in data order, and
    the identity of the version that was validated (pack refuses a file that changes under it)."""

    path: Path
    header: bytes
    tensors: tuple[TensorInfo, ...]
    identity: FileIdentity | None = None

    @property
    def data_start(self) -> int:
        return 8 + len(self.header)

    @property
    def nbytes(self) -> int:
        return self.tensors[-1].end if self.tensors else 0


@dataclass(frozen=True)
class ModelSource:
    """Everything one `pack` reads: the weight files and the small side files beside them."""

    files: tuple[SafetensorsFile, ...]
    extras: dict[str, bytes] = field(default_factory=dict)


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _file_kind(mode: int) -> str:
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file (after symlinks).

    Opened non-blocking, so a FIFO whose writer never comes cannot hang the open; the kind is then
    read from the open descriptor itself, so nothing can swap the file between check and read."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read ({exc.strerror})") from None
    mode = os.fstat(handle).st_mode
    if not stat.S_ISREG(mode):
        os.close(handle)
        raise UnsupportedInput(
            path, f"is {_file_kind(mode)}, not a regular file; only regular files are read"
        )
    os.set_blocking(handle, True)
    return handle


def read_regular_file(path: Path, limit: int, what: str) -> bytes:
    """The whole of a small regular file, refused (one line naming it) when larger than `limit`."""
    handle = open_regular(path)
    try:
        size = os.fstat(handle).st_size
        if size > limit:
            raise InvalidArgument(f"{path}: {what} is {size} bytes, more than the {limit}-byte limit")
        with os.fdopen(handle, "rb", closefd=False) as stream:
            data = stream.read(limit + 1)
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(handle)
    if len(data) > limit:  # grew since fstat
        raise InvalidArgument(f"{path}: {what} is more than the {limit}-byte limit")
    return data


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_tensor(path: Path, name: str, info: object) -> TensorInfo:
    def bad(reason: str) -> InvalidSafetensors:
        return InvalidSafetensors(path, f"tensor {name!r} {reason}")

    problem = unsafe_character(name)
    if problem:
        raise bad(f"has a {problem} in its name")
    if not isinstance(info, dict) or set(info) != _TENSOR_KEYS:
        raise bad("must have exactly the keys dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise bad(f"has unknown dtype {dtype!r}")
    shape_error = shape_problem(shape) if isinstance(shape, list) else "not a list"
    if shape_error:
        raise bad(f"has an invalid shape {shape!r} ({shape_error})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))):
        raise bad(f"has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise bad(f"has data_offsets {offsets} that end before they begin")
    nbytes = nbytes_of(dtype, math.prod(shape))
    if nbytes is None:
        raise bad(f"of dtype {dtype} and shape {shape} does not fill whole bytes")
    if nbytes != end - begin:
        raise bad(f"needs {nbytes} bytes for {dtype}{shape} but data_offsets span {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def read_safetensors(path: Path) -> SafetensorsFile:
    """Read and validate a safetensors file's header; raises InvalidSafetensors naming the problem.

    Pickle checkpoints are refused by suffix up front; a file that fails validation and starts
    with pickle or zip magic gets the pickle hint instead. (Magic alone cannot decide: a valid
    header length such as 640 begins with the bytes of pickle's protocol-2 opcode.)
    """
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    try:
        return _validate(path)
    except InvalidSafetensors:
        if _starts_like_pickle(path):
            raise _pickle_refusal(path) from None
        raise


def _validate(path: Path) -> SafetensorsFile:
    try:
        with os.fdopen(open_regular(path), "rb") as handle:
            identity = FileIdentity.of(handle.fileno())
            size = identity.size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InvalidSafetensors(path, f"file is {size} bytes, too short for the header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise InvalidSafetensors(path, f"header length {header_len} exceeds the 100 MB limit")
            if 8 + header_len > size:
                raise InvalidSafetensors(
                    path, f"header length {header_len} is larger than the file ({size} bytes)"
                )
            header = handle.read(header_len)
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read ({exc.strerror})") from None
    if not header.startswith(b"{"):
        raise InvalidSafetensors(path, "header does not start with '{'")
    try:
        doc = json.loads(header.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidSafetensors(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidSafetensors(path, "header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise InvalidSafetensors(path, "__metadata__ must map strings to strings")
    tensors = sorted(
        (_parse_tensor(path, name, info) for name, info in doc.items()), key=lambda t: (t.begin, t.end)
    )
    expected = 0
    for tensor in tensors:
        if tensor.begin != expected:
            kind = "overlaps the previous tensor" if tensor.begin < expected else "leaves a gap"
            raise InvalidSafetensors(
                path, f"tensor {tensor.name!r} starts at {tensor.begin}, expected {expected} ({kind})"
            )
        expected = tensor.end
    data_len = size - 8 - header_len
    if expected != data_len:
        raise InvalidSafetensors(
            path, f"tensors cover {expected} bytes of data but the file holds {data_len} after the header"
        )
    return SafetensorsFile(path, header, tuple(tensors), identity)


def check_unchanged(source: SafetensorsFile, handle: int) -> None:
    """Refuse to go on with `source` when the file open as `handle` is not the version that was
    validated: a pack of a file being written (a download, a copy, a training job's checkpoint)
    would store bytes that belong to neither the old nor the new file."""
    if source.identity is None:
        return
    moved = source.identity.differences(FileIdentity.of(handle))
    if moved:
        raise SourceChanged(source.path, moved)


def _starts_like_pickle(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4).startswith(_PICKLE_MAGIC)


def _pickle_refusal(path: Path) -> UnsupportedInput:
    return UnsupportedInput(
        path,
        "looks like a pickle-based checkpoint; blockstore never unpickles. Convert it to "
        "safetensors first (e.g. safetensors.torch.save_file in a trusted environment)",
    )


def read_range(handle: int, offset: int, length: int, path: Path) -> bytes:
    """Exactly `length` bytes at `offset`; a file that shrank since validation is an error."""
    data = os.pread(handle, length, offset)
    while len(data) < length:
        more = os.pread(handle, length - len(data), offset + len(data))
        if not more:
            raise InvalidSafetensors(
                path, f"file ended at byte {offset + len(data)} (truncated while reading)"
            )
        data += more
    return data


def _read_side_file(path: Path) -> bytes:
    return read_regular_file(path, MAX_SIDE_FILE_BYTES, "side file")


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(read_regular_file(index_path, MAX_INDEX_BYTES, "shard index"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise InvalidArgument(f"{index_path}: not a valid safetensors index ({exc})") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or unsafe_character(name):
            raise InvalidArgument(f"{index_path}: shard name {name!r} must be a plain file name")
    return [index_path.parent / name for name in names]


def _files_in_directory(directory: Path) -> tuple[list[Path], list[Path]]:
    """(weight files, side files) for a model directory."""
    index = directory / INDEX_NAME
    sides = [directory / name for name in SIDE_FILES if (directory / name).is_file()]
    if index.is_file():
        return _shards_from_index(index), [index, *sides]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single], sides
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise InvalidArgument(f"{directory}: no model.safetensors, {INDEX_NAME} or *.safetensors inside")
    return found, sides


def discover(inputs: Iterable[Path]) -> ModelSource:
    """Resolve the paths given to `pack` into validated files and side files, before any write."""
    weight_paths: list[Path] = []
    side_paths: list[Path] = []
    for path in inputs:
        if path.is_dir():
            weights, sides = _files_in_directory(path)
        elif path.exists():
            weights = [path]  # read_safetensors refuses anything but a regular file
            sides = [path.parent / name for name in SIDE_FILES if (path.parent / name).is_file()]
        else:
            raise InvalidArgument(f"{path}: no such file or directory")
        weight_paths += weights
        side_paths += [side for side in sides if side not in side_paths]
    names = [path.name for path in weight_paths]
    for path in weight_paths:
        problem = unsafe_character(path.name)
        if problem:  # the name is stored in the snapshot and written back on export
            raise InvalidArgument(f"{path.parent}: file name {path.name!r} has a {problem}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidArgument(
            f"two input files share the name {duplicates[0]!r}; a snapshot keys files by name"
        )
    files = tuple(read_safetensors(path) for path in weight_paths)
    seen: dict[str, Path] = {}
    for source in files:
        for tensor in source.tensors:
            if tensor.name in seen:
                raise InvalidArgument(
                    f"tensor {tensor.name!r} appears in both {seen[tensor.name]} and {source.path}"
                )
            seen[tensor.name] = source.path
    return ModelSource(files, {side.name: _read_side_file(side) for side in side_paths})

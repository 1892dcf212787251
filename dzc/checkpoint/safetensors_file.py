"""A strict, lazy safetensors reader (and a small writer for tests and requantized output).

Format: 8-byte little-endian header length N, N bytes of JSON header {name: {dtype, shape, data_offsets},
"__metadata__": {...}}, then the data section; offsets are relative to the data section.

Why our own reader: opening must cost one header read (a 700 GB checkpoint opens instantly), every defect must
be reported as a one-line `CheckpointError` naming file and tensor, and tensors must come back as zero-copy
views of one mmap in their *storage* dtype (bf16 as uint16, fp8 as uint8): decoding is the caller's choice.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from dzc.checkpoint.jsonfile import parse_json_object
from dzc.errors import CheckpointError

# Storage dtype of every safetensors dtype name we accept. bf16/fp8 are raw bits.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; `begin`/`end` are byte offsets inside the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """An opened .safetensors file: the header is parsed and checked, the data is mapped on first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mmap: Optional[mmap.mmap] = None
        header, self.data_start, self.file_size = _read_header(self.path)
        self.metadata: dict[str, Any] = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise CheckpointError(f"{self.path}: header '__metadata__' must be an object")
        data_size = self.file_size - self.data_start
        self._infos: dict[str, TensorInfo] = {
            name: _check_entry(self.path, name, entry, data_size) for name, entry in header.items()}
        _check_no_overlap(self.path, self._infos.values())

    # ---- header queries (no data read) -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def dtype_name(self, name: str) -> str:
        return self.info(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    # ---- data ------------------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray:
        """Read-only zero-copy view of `name` in its storage dtype (BF16 -> uint16, F8_* -> uint8)."""
        info = self.info(name)
        dtype = STORAGE_DTYPES[info.dtype]
        count = info.nbytes // dtype.itemsize
        if count == 0:
            return np.zeros(info.shape, dtype=dtype)
        mm = self._map()
        return np.frombuffer(mm, dtype=dtype, count=count, offset=self.data_start + info.begin).reshape(info.shape)

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            try:
                with open(self.path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size < self.file_size:
                        raise CheckpointError(f"{self.path}: file shrank from {self.file_size} to {size} bytes "
                                              f"since it was opened; it is being rewritten or truncated")
                    self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise CheckpointError(f"{self.path}: cannot map file ({exc.strerror})") from None
        return self._mmap

    def close(self) -> None:
        """Unmap if no array still views the data (views keep the mapping alive otherwise)."""
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # live numpy views; the mapping goes away with them
            self._mmap = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} tensors)"


# ---- header validation ---------------------------------------------------------------------------------------------
def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: only {size} bytes, too short for a safetensors file "
                                      f"(truncated or not safetensors)")
            (n,) = struct.unpack("<Q", prefix)
            if n == 0 or n > size - 8:
                raise CheckpointError(f"{path}: header length {n} does not fit in the {size}-byte file "
                                      f"(truncated, or not a safetensors file)")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {n} exceeds {MAX_HEADER_BYTES} bytes; "
                                      f"the file is damaged or not safetensors")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) != n:
        raise CheckpointError(f"{path}: header cut short ({len(raw)} of {n} bytes)")
    header = parse_json_object(raw, f"{path} (safetensors header)", CheckpointError)
    return header, 8 + n, size


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry must be an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(STORAGE_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    begin, end = offsets
    want = int(np.prod(shape, dtype=object)) * STORAGE_DTYPES[dtype].itemsize
    if end - begin != want:
        raise CheckpointError(f"{where}: data_offsets span {end - begin} bytes but {dtype} {shape} needs {want}")
    if end > data_size:
        raise CheckpointError(f"{where}: data_offsets end at {end}, past the {data_size}-byte data section "
                              f"(file truncated or header damaged)")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_no_overlap(path: Path, infos: Any) -> None:
    previous: Optional[TensorInfo] = None
    for info in sorted((i for i in infos if i.nbytes), key=lambda i: i.begin):
        if previous is not None and info.begin < previous.end:
            raise CheckpointError(f"{path}: tensors {previous.name!r} and {info.name!r} overlap in the data section; "
                                  f"the header is damaged")
        previous = info


# ---- writing -------------------------------------------------------------------------------------------------------
def write_safetensors(path: str | Path, tensors: Mapping[str, tuple[str, np.ndarray]],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write {name: (dtype name, storage array)} as a safetensors file.

    Storage arrays are what `tensor()` returns (BF16 as uint16, F8_E4M3 as uint8). Tensors are laid out by
    descending item size then name, so every tensor is naturally aligned, and the header is space-padded to 8.
    """
    entries: list[tuple[str, str, np.ndarray]] = []
    for name, (dtype, array) in tensors.items():
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown safetensors dtype {dtype!r} for {name!r}")
        want = STORAGE_DTYPES[dtype]
        array = np.asarray(array)
        if array.dtype.itemsize != want.itemsize or array.dtype.kind != want.kind:
            raise ValueError(f"{name!r}: {dtype} needs storage dtype {want}, got {array.dtype}")
        entries.append((name, dtype, np.array(array, dtype=want, order="C")))  # keeps 0-d shapes
    entries.sort(key=lambda e: (-e[2].dtype.itemsize, e[0]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, array in entries:
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, array in entries:
            f.write(array.tobytes())

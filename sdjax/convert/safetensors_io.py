"""Reading and writing .safetensors files with numpy alone: tensor by tensor, bf16 included, checked.

Layout: an 8-byte little-endian header size N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the tensor bytes.
Reading parses the header once and reads each tensor on demand, so a model is converted one tensor at
a time.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file (truncated, corrupt, or of another format)."""


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping name -> numpy array (read on access) over one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"missing weight file {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: not a safetensors file ({size} bytes, too short)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(
                    f"{self.path}: not a safetensors file, or truncated inside its header "
                    f"(header size {n}, file size {size})"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise SafetensorsError(f"{self.path}: corrupt safetensors header ({err})") from err
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        data_len = size - self._start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        needed = 0
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise SafetensorsError(f"{self.path}: corrupt header entry for {name!r}") from err
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a byte range that does not fit its shape")
            needed = max(needed, end)
            self._entries[name] = (dtype, shape, begin, end)
        if needed > data_len:
            raise SafetensorsError(
                f"{self.path}: truncated file: its header promises {needed} bytes of tensor data but only "
                f"{data_len} are present; download or copy it again"
            )

    def __getitem__(self, name: str) -> np.ndarray:
        """A fresh array holding the tensor, read from the file on each access (unlike a memory map, no
        file pages stay resident, so loading a model needs little more RAM than its parameters)."""
        dtype, shape, begin, end = self._entries[name]
        array = np.empty(shape, dtype)
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self._start + begin)
                got = f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
            if got != end - begin:
                raise SafetensorsError(f"{self.path}: truncated while reading {name!r}; download or copy it again")
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Writes `tensors` to `path` in the safetensors format (atomically: a temporary file, then a rename)."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.array(tensors[name], order="C", copy=None)  # (ascontiguousarray would make 0-d 1-d)
        if array.dtype not in _NAMES:
            raise ValueError(f"cannot store {name!r} of dtype {array.dtype} in safetensors")
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)

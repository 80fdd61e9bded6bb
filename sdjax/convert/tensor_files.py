"""Tensor files: reading and writing .safetensors with numpy alone, and PyTorch pickles read without
running code. Every other module of sdjax reads weights through `read_checkpoint` or `SafetensorsFile`.

Safetensors layout: an 8-byte little-endian header size N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the tensor bytes.
Reading parses the header once and reads each tensor on demand, so a model is converted one tensor at
a time. PyTorch pickles (`.ckpt`, `.pt`, `.bin`) go only through `torch.load(weights_only=True)`, and a
pickle named `.safetensors` is refused unread (`MisnamedPickleError`).
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from sdjax.errors import one_line

# Safetensors dtype names (the `Dtype` enum of the safetensors crate) that numpy can hold. Packed sub-byte
# floats (F4, F6_*) are not among them. fp8 names follow PyTorch's: F8_E4M3 is float8_e4m3fn.
_FLOAT_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_DTYPES = {
    **_FLOAT_DTYPES,
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "C64": np.dtype(np.complex64),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
FLOAT_DTYPES = frozenset(_FLOAT_DTYPES.values())
_MAX_HEADER = 100 * 2**20


# XLA:CPU adopts a host buffer without copying it when it is aligned to this many bytes (`aligned_empty`).
HOST_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a HOST_ALIGNMENT-byte boundary, so that
    `jax.device_put(array, may_alias=True)` on a CPU device takes it over instead of copying it."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file (truncated, corrupt, or of another format)."""


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping name -> numpy array (read on access) over one .safetensors file."""

    thread_safe = True  # every access opens the file itself
    fresh_arrays = True  # every access returns a new array (HOST_ALIGNMENT-aligned) that nothing else holds

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"missing weight file {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(9)
            if _is_pickle_head(head, size):
                raise MisnamedPickleError(misnamed_pickle_message(self.path))
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: not a safetensors file ({size} bytes, too short)")
            (n,) = struct.unpack("<Q", head[:8])
            f.seek(8)
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
            dtype, shape, begin, end = self._entry(name, info)
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a byte range that does not fit its shape")
            needed = max(needed, end)
            self._entries[name] = (dtype, shape, begin, end)
        if needed > data_len:
            raise SafetensorsError(
                f"{self.path}: truncated file: its header promises {needed} bytes of tensor data but only "
                f"{data_len} are present; download or copy it again"
            )

    def _entry(self, name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of one header entry; a dtype numpy cannot hold is named as such."""
        dtype_name = info.get("dtype") if isinstance(info, dict) else None
        if isinstance(dtype_name, str) and dtype_name not in _DTYPES:
            raise UnsupportedDtypeError(
                f"{self.path}: unsupported tensor dtype {dtype_name} for tensor {name!r}; sdjax reads "
                f"{', '.join(_DTYPES)} (convert the file to F32, F16 or BF16)"
            )
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsError(f"{self.path}: corrupt header entry for {name!r}") from err
        return dtype, shape, begin, end

    def __getitem__(self, name: str) -> np.ndarray:
        """A fresh array holding the tensor, read from the file on each access (unlike a memory map, no
        file pages stay resident, so loading a model needs little more RAM than its parameters)."""
        dtype, shape, begin, end = self._entries[name]
        array = aligned_empty(shape, dtype)
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self._start + begin)
                got = f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
            if got != end - begin:
                raise SafetensorsError(f"{self.path}: truncated while reading {name!r}; download or copy it again")
        return array

    def mapped(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map of its bytes in the file: for a layout change that reads
        it once (no copy of it is made first); the pages are unmapped when the array is dropped."""
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.empty(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._start + begin, shape=shape)

    def __contains__(self, name: object) -> bool:  # Mapping's default reads the tensor
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def origin(self, name: str) -> tuple[str, str]:
        """(file, name in the file) of a tensor, for messages."""
        return str(self.path), name


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Writes `tensors` to `path` in the safetensors format (atomically: a temporary file, then a rename).

    The header comes from each tensor's shape and dtype (`shape_of`/`dtype_of`: a lazy mapping such as
    `keymap.TorchTensors` is not read for it); then the tensors are read and written one at a time."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        dtype, shape = dtype_of(tensors, name), shape_of(tensors, name)
        if dtype not in _NAMES:
            raise ValueError(f"cannot store {name!r} of dtype {dtype} in safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            array = np.array(tensors[name], order="C", copy=None)  # (ascontiguousarray would make 0-d 1-d)
            if array.dtype != dtype_of(tensors, name) or tuple(array.shape) != tuple(header[name]["shape"]):
                raise ValueError(f"tensor {name!r} changed shape or dtype while being written")
            f.write(array.tobytes())
    os.replace(tmp, path)


class CheckpointError(ValueError):
    """A file that is not a loadable checkpoint (unknown layout, unsupported model, unsafe pickle), one line."""


def shape_of(tensors: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    """A tensor's shape without reading it, when the mapping can tell (`SafetensorsFile.shape`)."""
    shape = getattr(tensors, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(tensors[key].shape)


def dtype_of(tensors: Mapping[str, np.ndarray], key: str) -> np.dtype:
    """A tensor's dtype without reading it, when the mapping can tell (`SafetensorsFile.dtype`)."""
    dtype = getattr(tensors, "dtype", None)
    return np.dtype(dtype(key) if callable(dtype) else tensors[key].dtype)


def origin_of(tensors: Mapping[str, np.ndarray], key: str, default: str) -> tuple[str, str]:
    """(file, name in that file) of a tensor for messages, when the mapping can tell; else (`default`, key)."""
    origin = getattr(tensors, "origin", None)
    return origin(key) if callable(origin) else (default, key)


class UnsupportedDtypeError(SafetensorsError):
    """A tensor stored in a dtype sdjax cannot read (packed fp4/fp6, or a name it does not know)."""


class TensorDataError(ValueError):
    """A tensor that cannot be a model weight: integer or boolean where a float is expected, or NaN/Inf."""


def dtype_name(dtype) -> str:
    """The safetensors name of a dtype ("F16", "I64", ...), else numpy's."""
    dtype = np.dtype(dtype)
    return _NAMES.get(dtype, dtype.name)


def check_float(dtype, where: str, key: str) -> None:
    """Raises `TensorDataError` unless `dtype` is a float dtype (F64 ... F8_*): integer tensors in place of
    weights mean another kind of file, or quantized weights, which a cast would silently garble."""
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise TensorDataError(
            f"{where}: tensor {key!r} is {dtype_name(dtype)}, not a float tensor: this is not a model weight "
            "file (or quantized weights sdjax cannot read)"
        )


_HALF_BITS = {np.dtype(np.float16): 0x7C00, np.dtype(ml_dtypes.bfloat16): 0x7F80}  # +Inf's bit pattern


def all_finite(array: np.ndarray) -> bool:
    """Whether every value is finite. 16-bit floats are tested on their bits (|bits| < +Inf's bits):
    numpy's isfinite is slow on float16 and bfloat16 (4-5x and 2x the float32 time per byte)."""
    inf_bits = _HALF_BITS.get(array.dtype)
    if inf_bits is None or array.size == 0:
        return bool(np.isfinite(array).all())
    return bool(np.bitwise_and(array.view(np.uint16), 0x7FFF).max() < inf_bits)


def count_non_finite(array: np.ndarray) -> int:
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def non_finite_error(array: np.ndarray, where: str, key: str, source: np.ndarray | None = None) -> TensorDataError:
    """The error for `array` (tensor `key` of file `where`) holding NaN or Inf; when `source` (the tensor as
    stored, before a cast to `array`'s dtype) is finite, the cast overflowed instead."""
    bad = count_non_finite(array)
    if source is not None and source.dtype != array.dtype and count_non_finite(source) == 0:
        return TensorDataError(
            f"{where}: tensor {key!r} has {bad} values beyond the range of {array.dtype.name}, which become "
            "Inf: load the model in float32 or bfloat16"
        )
    return TensorDataError(
        f"{where}: tensor {key!r} has {bad} NaN/Inf values; the file is damaged or was saved from a diverged "
        "training run"
    )


def check_finite(array: np.ndarray, where: str, key: str, source: np.ndarray | None = None) -> None:
    """Raises `non_finite_error` unless every value of `array` is finite."""
    if not all_finite(array):
        raise non_finite_error(array, where, key, source)


class ShardedTensors(Mapping[str, np.ndarray]):
    """One mapping over the tensors of several safetensors files (the shards of one component)."""

    thread_safe = True
    fresh_arrays = True

    def __init__(self, files: list[Path]):
        self._where: dict[str, SafetensorsFile] = {}
        for path in files:
            shard = SafetensorsFile(path)
            for key in shard:
                if key in self._where:
                    raise ValueError(f"{path}: tensor {key!r} also appears in {self._where[key].path}")
                self._where[key] = shard

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._where[key].dtype(key)

    def origin(self, key: str) -> tuple[str, str]:
        return self._where[key].origin(key)

    def mapped(self, key: str) -> np.ndarray:
        return self._where[key].mapped(key)

    def __contains__(self, key: object) -> bool:  # Mapping's default reads the tensor
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class _Tensors(Mapping[str, np.ndarray]):
    """A plain dict of arrays with the `shape(key)` method the converters use (pickle checkpoints)."""

    def __init__(self, arrays: dict[str, np.ndarray], path: Path):
        self._arrays = arrays
        self.path = path
        self.metadata: dict[str, str] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._arrays[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return self._arrays[key].dtype

    def origin(self, key: str) -> tuple[str, str]:
        return str(self.path), key


@functools.cache
def _ml_dtypes_of_torch() -> dict:
    """torch dtype -> numpy dtype for the float types torch's `.numpy()` refuses (bfloat16, float8_*)."""
    import torch

    names = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    return {getattr(torch, n): np.dtype(getattr(ml_dtypes, n)) for n in names if hasattr(torch, n)}


def _torch_to_numpy(obj: Any) -> Any:
    """torch tensors (bf16 and fp8 included) -> numpy, recursively through dicts, lists and tuples."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        special = _ml_dtypes_of_torch().get(t.dtype)
        if special is not None:
            bits = torch.int16 if special.itemsize == 2 else torch.uint8
            return t.view(bits).numpy().view(special)
        return t.numpy()
    if isinstance(obj, dict):
        return {k: _torch_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_torch_to_numpy(v) for v in obj)
    return obj


def load_torch_pickle(path: str | Path) -> Any:
    """A PyTorch pickle (`.ckpt`, `.pt`, `.bin`) read only through `torch.load(weights_only=True)`, which
    refuses to run code; tensors become numpy arrays. Never plain unpickling: without torch, an error."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":  # never unpickle what claims to be safe to open
        raise MisnamedPickleError(misnamed_pickle_message(path))
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch pickle, which sdjax reads only with torch.load(weights_only=True) and torch is "
            "not installed: install torch, or convert the file to .safetensors"
        ) from None
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.load can memory-map only the zip format
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: the safe loader refuses this pickle (it holds Python objects besides tensors): "
                f"{one_line(err)}"
            ) from None
        reason = one_line(err)
        raise CheckpointError(f"{path}: cannot read this PyTorch file (truncated or corrupt?): {reason}") from None
    return _torch_to_numpy(obj)


def _is_pickle_head(head: bytes, size: int) -> bool:
    """Whether a file's first 9 bytes (of `size`) open a PyTorch pickle rather than a safetensors file: a
    safetensors file starts with its 8-byte header size and a JSON "{" (the size's first byte may be 0x80)."""
    (header_size,) = struct.unpack("<Q", head[:8].ljust(8, b"\0"))
    if head[8:9] == b"{" and header_size <= size - 8:
        return False
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"  # torch >= 1.6 zip, or pickle protocol >= 2


def is_torch_pickle(path: str | Path) -> bool:
    """Whether a file is a PyTorch pickle (zip archive or legacy pickle) rather than a safetensors file,
    told by content."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    return _is_pickle_head(head, path.stat().st_size)


class MisnamedPickleError(SafetensorsError, CheckpointError):
    """A pickle (which could run code when loaded) where a safetensors file is expected."""


def misnamed_pickle_message(path: Path) -> str:
    if path.suffix.lower() != ".safetensors":
        return f"{path} is a PyTorch pickle, not a safetensors file; convert it to .safetensors with a trusted tool"
    return (
        f"{path} is a PyTorch pickle named .safetensors, not a safetensors file; sdjax does not unpickle files "
        "named .safetensors (convert it with a trusted tool)"
    )


def read_checkpoint(path: str | Path) -> Mapping[str, np.ndarray]:
    """The tensors of a checkpoint file as a mapping name -> numpy array (read on access for safetensors).

    Safetensors and PyTorch pickles are told apart by content, whatever the extension; pickles go through
    `load_torch_pickle`, their nested `state_dict` is unwrapped and non-tensor entries (`global_step`, ...)
    are dropped.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if is_torch_pickle(path):
        obj = load_torch_pickle(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: a PyTorch file holding a {type(obj).__name__}, not a dict of tensors")
        return _Tensors({k: v for k, v in obj.items() if isinstance(v, np.ndarray)}, path)
    return SafetensorsFile(path)

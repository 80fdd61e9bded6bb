"""The declarative map between PyTorch state-dict names and sdjax parameter paths, and the tensor layouts.

sdjax modules are named after the diffusers/transformers attributes, so a parameter path joined with "."
is the PyTorch module name; only the leaf differs (`kernel`/`scale`/`embedding` are PyTorch's `weight`).
The map is built from the abstract parameter tree of the model (its shapes, from `jax.eval_shape`) and
pairs each parameter with one PyTorch key and one layout transform. Conversion is total and checked in
both directions: every key of the file is used once, every parameter is filled, every shape verified;
every tensor is a float tensor (F64 ... F8_*, upcast or cast to the model's dtype) and every converted
value finite (`TensorDataError` names the file and tensor otherwise).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.tensor_files import (
    HOST_ALIGNMENT,
    aligned_empty,
    all_finite,
    check_float,
    dtype_of,
    non_finite_error,
    origin_of,
    shape_of,
)

# Layout transforms: PyTorch tensor -> sdjax array, and back.
_TO_JAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda w: w.transpose(2, 3, 1, 0),  # OIHW -> HWIO
    "linear": lambda w: w.T,  # (out, in) -> (in, out)
    "copy": lambda w: w,
}
_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda w: w.transpose(3, 2, 0, 1),  # HWIO -> OIHW
    "linear": lambda w: w.T,
    "copy": lambda w: w,
}
# Tensors converted at once while loading from a thread-safe mapping (reads, copies and transfers overlap).
LOAD_THREADS = 4
# A leaf not listed here has no PyTorch name; `positional_embedding` is a bare nn.Parameter in PyTorch too.
_LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "bias": "bias",
    "positional_embedding": "positional_embedding",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its PyTorch key, its sdjax path, its layout and both shapes."""

    torch_key: str
    path: tuple[str, ...]
    layout: str
    shape: tuple[int, ...]  # sdjax shape

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(_TO_TORCH[self.layout](np.empty(self.shape, np.uint8)).shape)


def _layout(leaf: str, ndim: int) -> str:
    if leaf == "kernel":
        return {4: "conv", 2: "linear"}[ndim]
    return "copy"


def build_keymap(abstract_params: Mapping, prefix: str = "") -> dict[str, Entry]:
    """torch key -> Entry for every leaf of an abstract parameter tree (from `jax.eval_shape(init)`)."""
    entries = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        path = tuple(k.key for k in key_path)
        if path[-1] not in _LEAF_NAMES:
            raise ValueError(f"parameter {'/'.join(path)} has no PyTorch name")
        torch_key = prefix + ".".join(path[:-1] + (_LEAF_NAMES[path[-1]],))
        entries[torch_key] = Entry(torch_key, path, _layout(path[-1], len(leaf.shape)), tuple(leaf.shape))
    return entries


def listing(keys, limit: int = 8) -> str:
    """Up to `limit` of `keys`, sorted, for an error message ("a, b, ... and 3 more")."""
    keys = sorted(keys)
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class ConversionError(ValueError):
    """Weights that do not fit the model: missing, unexpected or wrongly shaped keys (all named)."""


def _jax_layout(array: np.ndarray, layout: str, dtype, reuse: bool = False) -> np.ndarray:
    """A PyTorch-layout tensor in sdjax's layout (`_TO_JAX`) and `dtype`, in a fresh HOST_ALIGNMENT-aligned
    C-contiguous buffer (one the CPU device adopts without a copy), or with `reuse` (`array` is nobody
    else's) `array` itself when it already is one."""
    return _to_jax(array, layout, dtype, reuse)[0]


# The copy into sdjax's layout is made in slabs of about this size along the stored tensor's leading axes
# (its memory order), each tested for NaN/Inf right after it is written, while still in cache: the test
# costs little, and the blocked copy is no slower than numpy's copy of the whole transposed view.
_SLAB_BYTES = 1 << 20


def _to_jax(array: np.ndarray, layout: str, dtype, reuse: bool = False) -> tuple[np.ndarray, bool]:
    """(`_jax_layout`'s result, whether all its values are finite)."""
    dtype = np.dtype(dtype)
    jax_array = _TO_JAX[layout](array)
    if reuse and jax_array.dtype == dtype and jax_array.flags.c_contiguous:
        if jax_array.ctypes.data % HOST_ALIGNMENT == 0:
            return jax_array, all_finite(jax_array)
    out = aligned_empty(jax_array.shape, dtype)
    stored_order = _TO_TORCH[layout](out)  # `out` seen in `array`'s axis order
    finite = True
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow to Inf is reported by the caller
        for index in _slabs(array.shape, dtype.itemsize):
            np.copyto(stored_order[index], array[index], casting="unsafe")
            finite = finite and all_finite(stored_order[index])
    return out, finite


def _slabs(shape: tuple[int, ...], itemsize: int):
    """Indices cutting a C-contiguous array of `shape` into contiguous slabs of at most about _SLAB_BYTES:
    ranges of rows along the first axis whose rows are small enough, every index of the axes before it."""
    if not shape:
        yield (...,)
        return
    axis = next(a for a in range(len(shape)) if a == len(shape) - 1 or _bytes(shape[a + 1 :], itemsize) <= _SLAB_BYTES)
    rows = max(1, _SLAB_BYTES // max(1, _bytes(shape[axis + 1 :], itemsize)))
    for outer in np.ndindex(*shape[:axis]):
        for start in range(0, shape[axis], rows):
            yield outer + (slice(start, start + rows),)


def _bytes(shape: tuple[int, ...], itemsize: int) -> int:
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def torch_to_params(
    tensors: Mapping[str, np.ndarray],
    keymap: Mapping[str, Entry],
    dtype=jnp.float32,
    *,
    what: str = "weights",
    aliases: Mapping[str, str] | None = None,
    ignore: Callable[[str], bool] = lambda key: False,
) -> dict:
    """Builds the nested sdjax parameter dict from PyTorch-named tensors, cast to `dtype`.

    Args:
      tensors: torch key -> numpy array (e.g. a memory-mapped `SafetensorsFile`), PyTorch layouts.
      keymap: from `build_keymap`.
      aliases: old key -> current key, for legacy names of the same tensor.
      ignore: keys of the file that are not parameters (e.g. position-id buffers) and are skipped.
    Raises:
      ConversionError naming every missing, unexpected and mis-shaped key; TensorDataError naming the first
      tensor (file and key) that is not a float tensor or holds NaN/Inf.
    """
    aliases = aliases or {}
    source: dict[str, str] = {}
    unexpected = []
    for key in tensors:
        target = aliases.get(key, key)
        if target in keymap and target not in source:
            source[target] = key
        elif not ignore(key):
            unexpected.append(key)
    missing = [k for k in keymap if k not in source]
    wrong = [
        f"{k} {shape_of(tensors, source[k])} (expected {keymap[k].torch_shape})"
        for k in keymap
        if k in source and shape_of(tensors, source[k]) != keymap[k].torch_shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {listing(wrong, 4)}")
    if problems:
        raise ConversionError(f"{what} do not fit the model: " + "; ".join(problems))

    for key in keymap:  # before any conversion: dtypes come from the headers
        check_float(dtype_of(tensors, source[key]), *origin_of(tensors, source[key], what))

    def convert(key: str) -> jax.Array:
        # At most one host copy (layout change and cast together) into an aligned buffer, which a CPU device
        # then adopts without copying (`aligned_empty`); elsewhere a plain transfer. jnp.asarray would run an
        # eager convert per distinct shape (a tiny compile for each of SD 1.5's ~1,100 shapes: README, Memory).
        layout = keymap[key].layout
        if mapped is not None and layout != "copy":  # a layout change reads the file's bytes once
            stored = mapped(source[key])
            array, finite = _to_jax(stored, layout, dtype)
        else:
            stored = tensors[source[key]]
            array, finite = _to_jax(stored, layout, dtype, reuse=fresh)
        if not finite:
            raise non_finite_error(array, *origin_of(tensors, source[key], what), source=stored)
        return jax.device_put(array, may_alias=True)

    mapped = getattr(tensors, "mapped", None)
    fresh = getattr(tensors, "fresh_arrays", False)
    keys = list(keymap)
    if getattr(tensors, "thread_safe", False):  # file reads, copies and transfers release the GIL
        arrays = _in_threads(convert, keys)
    else:
        arrays = {key: convert(key) for key in keys}
    params: dict = {}
    for key, entry in keymap.items():
        node = params
        for name in entry.path[:-1]:
            node = node.setdefault(name, {})
        node[entry.path[-1]] = arrays[key]
    return params


def _in_threads(convert: Callable[[str], jax.Array], keys: list[str]) -> dict[str, jax.Array]:
    """key -> convert(key) over LOAD_THREADS threads; on the first error (in key order) the conversions
    not yet started are cancelled, so a bad tensor is reported without reading the rest of the model."""
    with concurrent.futures.ThreadPoolExecutor(LOAD_THREADS) as pool:
        futures = [pool.submit(convert, key) for key in keys]
        try:
            return {key: future.result() for key, future in zip(keys, futures, strict=True)}
        except BaseException:
            for future in futures:
                future.cancel()
            raise


class TorchTensors(Mapping):
    """torch key -> numpy array in PyTorch layout (optionally cast), each converted when it is read, so that
    a writer holds one converted tensor at a time; `shape(key)`/`dtype(key)` answer without converting.
    `renamed(fn)` gives the same tensors under other keys."""

    def __init__(self, params: Mapping, keymap: Mapping[str, Entry], dtype=None):
        self._params, self._entries, self._dtype = params, dict(keymap), dtype
        for entry in self._entries.values():
            shape = tuple(self._leaf(entry).shape)
            if shape != entry.shape:
                raise ConversionError(f"parameter {'/'.join(entry.path)} has shape {shape}, not {entry.shape}")

    def _leaf(self, entry: Entry):
        node = self._params
        for name in entry.path:
            node = node[name]
        return node

    def __getitem__(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        array = np.asarray(jax.device_get(self._leaf(entry)))
        return np.ascontiguousarray(
            _TO_TORCH[entry.layout](array if self._dtype is None else array.astype(self._dtype))
        )

    def __contains__(self, key: object) -> bool:  # Mapping's default converts the tensor
        return key in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].torch_shape

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._dtype if self._dtype is not None else self._leaf(self._entries[key]).dtype)

    def renamed(self, rename: Callable[[str], str]) -> TorchTensors:
        return TorchTensors(self._params, {rename(k): e for k, e in self._entries.items()}, self._dtype)


def params_to_torch(params: Mapping, keymap: Mapping[str, Entry], dtype=None) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_params`: torch key -> numpy array in PyTorch layout (optionally cast)."""
    return dict(TorchTensors(params, keymap, dtype))

"""The declarative map between PyTorch state-dict names and sdjax parameter paths, and the tensor layouts.

sdjax modules are named after the diffusers/transformers attributes, so a parameter path joined with "."
is the PyTorch module name; only the leaf differs (`kernel`/`scale`/`embedding` are PyTorch's `weight`).
The map is built from the abstract parameter tree of the model (its shapes, from `jax.eval_shape`) and
pairs each parameter with one PyTorch key and one layout transform. Conversion is total and checked in
both directions: every key of the file is used once, every parameter is filled, every shape verified.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.tensor_files import HOST_ALIGNMENT, aligned_empty, shape_of

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
    dtype = np.dtype(dtype)
    array = _TO_JAX[layout](array)
    if reuse and array.dtype == dtype and array.flags.c_contiguous and array.ctypes.data % HOST_ALIGNMENT == 0:
        return array
    out = aligned_empty(array.shape, dtype)
    np.copyto(out, array, casting="unsafe")
    return out


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
      ConversionError naming every missing, unexpected and mis-shaped key.
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

    def convert(key: str) -> jax.Array:
        # At most one host copy (layout change and cast together) into an aligned buffer, which a CPU device
        # then adopts without copying (`aligned_empty`); elsewhere a plain transfer. jnp.asarray would run an
        # eager convert per distinct shape (a tiny compile for each of SD 1.5's ~1,100 shapes: README, Memory).
        layout = keymap[key].layout
        if mapped is not None and layout != "copy":  # a layout change reads the file's bytes once
            array = _jax_layout(mapped(source[key]), layout, dtype)
        else:
            array = _jax_layout(tensors[source[key]], layout, dtype, reuse=fresh)
        return jax.device_put(array, may_alias=True)

    mapped = getattr(tensors, "mapped", None)
    fresh = getattr(tensors, "fresh_arrays", False)

    keys = list(keymap)
    if getattr(tensors, "thread_safe", False):  # file reads, copies and transfers release the GIL
        with concurrent.futures.ThreadPoolExecutor(LOAD_THREADS) as pool:
            arrays = dict(zip(keys, pool.map(convert, keys), strict=True))
    else:
        arrays = {key: convert(key) for key in keys}
    params: dict = {}
    for key, entry in keymap.items():
        node = params
        for name in entry.path[:-1]:
            node = node.setdefault(name, {})
        node[entry.path[-1]] = arrays[key]
    return params


def params_to_torch(params: Mapping, keymap: Mapping[str, Entry], dtype=None) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_params`: torch key -> numpy array in PyTorch layout (optionally cast)."""
    out = {}
    for key, entry in keymap.items():
        node = params
        for name in entry.path:
            node = node[name]
        array = np.asarray(jax.device_get(node))
        if tuple(array.shape) != entry.shape:
            raise ConversionError(f"parameter {'/'.join(entry.path)} has shape {array.shape}, not {entry.shape}")
        out[key] = np.ascontiguousarray(_TO_TORCH[entry.layout](array if dtype is None else array.astype(dtype)))
    return out

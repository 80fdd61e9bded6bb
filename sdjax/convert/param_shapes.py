"""The parameter shapes of a model, remembered: tracing a real UNet's `init` to learn them takes ~2 s.

`abstract_params(module)` returns the (path -> `jax.ShapeDtypeStruct`) tree of `module`'s parameters. The
first time for an architecture it traces `module.init` (`jax.eval_shape`, nothing allocated); the result is
kept for the process and written as a small JSON file in param-shapes/ of the persistent compilation cache
(`sdjax.compile_cache`: off with SDJAX_CACHE_DIR=off or --cache-dir off), so that later
processes loading the same architecture skip the trace. An entry is keyed by the module's class and every
field (its config, dtype, ...), the source of `sdjax/nn` and the jax and flax versions: a change to any of
them is a new key, never a stale shape. An unreadable entry is traced again; a cache that cannot be written
is only a slower load. Shapes are not trusted blindly either way: conversion checks every tensor against
them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import flax
import jax
import jax.numpy as jnp

from sdjax import files

_NN = Path(__file__).resolve().parents[1] / "nn"


@functools.cache
def _code_version() -> str:
    """A digest of what decides parameter shapes besides the config: sdjax/nn's source, jax and flax."""
    digest = hashlib.sha256(f"{jax.__version__} {flax.__version__}".encode())
    for path in sorted(_NN.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _key(module) -> str:
    fields = {
        f.name: repr(getattr(module, f.name)) for f in dataclasses.fields(module) if f.name not in ("parent", "name")
    }
    text = json.dumps([type(module).__module__, type(module).__qualname__, fields, _code_version()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _directory() -> Path | None:
    """param-shapes/ in the compilation cache in use (sample.py's --cache-dir, `enable_compilation_cache`),
    else in the default one; None when the cache is off."""
    from sdjax.compile_cache import default_cache_dir

    if not jax.config.jax_enable_compilation_cache:
        return None
    configured = jax.config.jax_compilation_cache_dir
    base = Path(configured) if configured else default_cache_dir()
    return None if base is None else base / "param-shapes"


def _to_json(tree) -> str:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    rows = [[[k.key for k in path], list(leaf.shape), jnp.dtype(leaf.dtype).name] for path, leaf in leaves]
    return json.dumps({"leaves": rows}, separators=(",", ":"))


def _from_json(text: str) -> dict:
    tree: dict = {}
    for path, shape, dtype in json.loads(text)["leaves"]:
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    return tree


@dataclasses.dataclass(frozen=True)
class _Architecture:
    """A module, equal to another by its cache key alone (flax modules need not be hashable)."""

    key: str
    module: object = dataclasses.field(compare=False)


@functools.lru_cache(maxsize=64)
def _remembered(architecture: _Architecture) -> dict:
    key, module = architecture.key, architecture.module
    directory = _directory()
    path = None if directory is None else directory / f"{key}.json"
    if path is not None and path.is_file():
        try:
            return _from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: trace again and rewrite it
    shapes = jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())["params"]
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.access(path.parent, os.W_OK):
                files.write_text(path, _to_json(shapes))
        except OSError:
            pass  # a read-only or full disk: the next load traces again
    return shapes


def abstract_params(module) -> dict:
    """Shapes and dtypes (`jax.ShapeDtypeStruct`s) of every parameter of `module`, without allocating them:
    traced once per architecture, then read from the cache (see the module doc)."""
    return _remembered(_Architecture(_key(module), module))


__all__ = ["abstract_params"]

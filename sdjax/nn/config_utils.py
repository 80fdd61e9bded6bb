"""Frozen-dataclass architecture configs read from, and written back to, diffusers/transformers config.json.

Every key of a config file is accounted for: a field of the dataclass; an option sdjax does not implement,
accepted only at the value that makes it a no-op (else an error naming it); a setting that cannot change
the forward pass (listed per model); or metadata starting with "_". Anything else is an error, so no
option is silently ignored. Every field's value is checked against the field's type annotation (int, float,
bool, str, tuple[X, ...] for a JSON list, unions, None for null) before the dataclass is built.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import jax.numpy as jnp

C = TypeVar("C")


def _freeze(value: Any) -> Any:
    """JSON lists -> tuples (recursively), so configs are hashable and compare equal after a round trip."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class ConfigTypeError(ValueError):
    """A config.json value of the wrong JSON type for its field (e.g. a string where an integer belongs)."""


def _type_matches(value: Any, hint: Any) -> bool:
    """Whether a (frozen) JSON value fits a field annotation; a JSON integer fits a float field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_type_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_type_matches(v, a) for v, a in zip(value, args, strict=True))
    return True  # Any, or an annotation this check does not know


_JSON_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _type_name(hint: Any) -> str:
    """A field annotation in JSON words: "an integer or a list of integers", "a number or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        names = [_type_name(arg) for arg in args]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _type_name(args[0]).removeprefix("an ").removeprefix("a ")
            return f"a list of {item}s"
        return f"a list of {len(args)} values"
    return _JSON_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _check_types(cls: type, kwargs: dict[str, Any], raw: dict[str, Any], what: str) -> None:
    """Raises `ConfigTypeError` for the first field whose value does not fit its annotation."""
    hints = typing.get_type_hints(cls)
    for key, value in kwargs.items():
        if not _type_matches(value, hints[key]):
            raise ConfigTypeError(
                f"{what}: {key} is {json.dumps(raw[key], default=str)}, but it must be {_type_name(hints[key])}; "
                "fix the value in the file"
            )


def config_from_dict(
    cls: type[C],
    raw: dict[str, Any],
    *,
    what: str,
    unsupported_defaults: dict[str, Any],
    no_effect: frozenset[str] = frozenset(),
) -> C:
    """Builds `cls` from a config dict, refusing options that sdjax would otherwise silently ignore.

    Args:
      cls: a frozen dataclass whose fields are the supported options.
      raw: the parsed config.json.
      what: names the config in error messages (e.g. "unet/config.json").
      unsupported_defaults: options sdjax does not implement, with the value at which they change nothing.
      no_effect: keys that cannot change the forward pass (training-only or bookkeeping settings).
    Raises:
      ValueError (one line naming `what` and the key): an unknown or unsupported option, a value of the wrong
      type for its field (`ConfigTypeError`), or values the dataclass refuses.
    """
    if not isinstance(raw, dict):
        raise ConfigTypeError(f"{what}: a config must be a JSON object, not {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key.startswith("_") or key in no_effect:
            continue
        if key in fields:
            kwargs[key] = _freeze(value)
        elif key in unsupported_defaults:
            default = unsupported_defaults[key]
            if _freeze(value) != _freeze(default):
                raise ValueError(f"{what}: option {key}={value!r} is not supported by sdjax (only {default!r} is)")
        else:
            raise ValueError(f"{what}: unknown option {key!r}; sdjax cannot tell what it would change")
    _check_types(cls, kwargs, raw, what)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: {err}") from err


def config_to_dict(config: Any, unsupported_defaults: dict[str, Any], extra: dict[str, Any]) -> dict:
    """The config as a JSON-ready dict: `extra` metadata, every field, and the no-op unsupported options."""
    out = dict(extra)
    out.update({k: _thaw(v) for k, v in dataclasses.asdict(config).items()})
    for key, default in unsupported_defaults.items():
        out.setdefault(key, _thaw(default))
    return out


def read_json(path: Path) -> dict:
    """Parses a JSON file, with a one-line error naming the file when it is missing or malformed."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype) -> jnp.dtype:
    """A parameter/compute dtype given by name or as a dtype; one of COMPUTE_DTYPES, else ValueError."""
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {list(COMPUTE_DTYPES)}")
    return jnp.dtype(name)

"""diffusers scheduler_config.json -> scheduler dataclasses, the way diffusers' `from_config` resolves it.

Keys the target diffusers class declares take the file's value, else that class's default (so an SD 1.5
PNDM config gives Euler diffusers' Euler default "linspace" spacing). Keys only another scheduler class
declares (e.g. PNDM's `skip_prk_steps` when building Euler) are dropped, as diffusers drops them: they cannot
change this scheduler. Everything else is checked: a declared option sdjax does not implement is accepted
only at its no-op value, unknown keys are refused, and rescale_betas_zero_snr=True is refused for classes
that would silently ignore it. Errors are one line and name the option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from sdjax.schedulers._base import Scheduler
from sdjax.schedulers._common import PREDICTION_TYPES, NoiseSchedule

_SCHEDULE_FIELDS = frozenset(f.name for f in dataclasses.fields(NoiseSchedule))


def _freeze(value: Any) -> Any:
    """JSON lists -> tuples, so configs are hashable."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def build(
    cls: type[Scheduler],
    config: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    label: str,
    known_keys: Iterable[str],
) -> Scheduler:
    """A `cls` scheduler from a diffusers config dict, with `overrides` (diffusers options or our fields) on top.

    Args:
      label: names the scheduler in error messages (e.g. "euler_a").
      known_keys: every option any supported diffusers scheduler class declares.
    """
    defaults = dict(cls.diffusers_defaults)
    fields = {f.name for f in dataclasses.fields(cls)} - {"schedule"}
    options = dict(defaults)
    known = set(known_keys)
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in options:
            options[key] = value
        elif key == "rescale_betas_zero_snr" and value:
            raise ValueError(f"{label}: rescale_betas_zero_snr=True is not supported by {cls.diffusers_class}")
        elif key not in known:
            raise ValueError(f"{label}: unknown scheduler option {key!r}")
    for key, value in overrides.items():
        if key not in options and key not in fields:
            raise ValueError(f"{label}: {cls.diffusers_class} has no option {key!r}")
        options[key] = value

    supported = dict(cls.supported_values)
    schedule_kwargs, family_kwargs = {}, {}
    for key, value in options.items():
        value = _freeze(value)
        if key in _SCHEDULE_FIELDS:
            schedule_kwargs[key] = value
        elif key in fields:
            family_kwargs[key] = value
        else:
            allowed = _freeze(supported.get(key, defaults.get(key)))
            if value != allowed:
                raise ValueError(f"{label}: scheduler option {key}={value!r} is not supported (only {allowed!r})")
    try:
        schedule = NoiseSchedule(**schedule_kwargs)
        prediction = schedule.prediction_type
        if prediction not in cls.prediction_types:
            raise ValueError(
                f"prediction_type {prediction!r} is not supported by {cls.diffusers_class} "
                f"(it supports {', '.join(cls.prediction_types)})"
            )
        return cls(schedule=schedule, **family_kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{label}: {err}") from err


def with_prediction_type(config: Mapping[str, Any], prediction_type: str | None) -> dict[str, Any]:
    """A copy of a scheduler_config.json dict with its prediction_type replaced (None: unchanged); a
    one-line ValueError for a name other than epsilon, v_prediction or sample."""
    if prediction_type is None:
        return dict(config)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
    return {**config, "prediction_type": prediction_type}

"""Diffusion schedulers as frozen configs plus pure functions, matching diffusers' PyTorch schedulers.

    sched = schedulers.from_name("dpmpp_2m_karras", pipe.scheduler_config)    # A1111-style name
    sched = schedulers.from_diffusers_config(pipe.scheduler_config)          # the model's own scheduler
    state = sched.init(num_steps, latents.shape, max_steps=150)
    x = noise * sched.init_noise_sigma(state)
    for _ in range(sched.num_model_calls(num_steps)):                          # or loop.sample (one jit)
        out = model(sched.scale_model_input(state, x), state.timestep)
        x, state = sched.step(state, out, x, noise=...)                        # noise only if sched.stochastic

Names and their diffusers equivalents (all built from the model's scheduler_config.json):
ddim (DDIMScheduler), pndm (PNDMScheduler, skip_prk_steps=True), lms / lms_karras (LMSDiscreteScheduler),
euler (EulerDiscreteScheduler), euler_a (EulerAncestralDiscreteScheduler), heun (HeunDiscreteScheduler),
dpmpp_2m / dpmpp_2m_karras (DPMSolverMultistepScheduler, dpmsolver++, order 2), dpmpp_2m_sde_karras
(DPMSolverMultistepScheduler, sde-dpmsolver++, Karras sigmas), unipc (UniPCMultistepScheduler),
ddpm (DDPMScheduler).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

from sdjax.schedulers._base import Scheduler, SchedulerState
from sdjax.schedulers._common import PREDICTION_TYPES, NoiseSchedule, add_noise, alphas_cumprod, velocity
from sdjax.schedulers._config import build, with_prediction_type
from sdjax.schedulers.ddim import DDIM
from sdjax.schedulers.ddpm import DDPM
from sdjax.schedulers.dpm_solver import DPMSolverMultistep
from sdjax.schedulers.euler import Euler, EulerAncestral, Heun
from sdjax.schedulers.lms import LMS
from sdjax.schedulers.pndm import PNDM
from sdjax.schedulers.unipc import UniPC

FAMILIES: tuple[type[Scheduler], ...] = (DDIM, PNDM, LMS, Euler, EulerAncestral, Heun, DPMSolverMultistep, UniPC, DDPM)

# name -> (family, diffusers options the name fixes on top of the model's config)
SCHEDULERS: Mapping[str, tuple[type[Scheduler], Mapping[str, Any]]] = types.MappingProxyType(
    {
        "ddim": (DDIM, {}),
        "pndm": (PNDM, {"skip_prk_steps": True}),
        "lms": (LMS, {"use_karras_sigmas": False}),
        "lms_karras": (LMS, {"use_karras_sigmas": True}),
        "euler": (Euler, {}),
        "euler_a": (EulerAncestral, {}),
        "heun": (Heun, {}),
        "dpmpp_2m": (
            DPMSolverMultistep,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        ),
        "dpmpp_2m_karras": (
            DPMSolverMultistep,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
        "dpmpp_2m_sde_karras": (DPMSolverMultistep, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
        "unipc": (UniPC, {}),
        "ddpm": (DDPM, {}),
    }
)
NAMES = tuple(SCHEDULERS)

_KNOWN_KEYS = frozenset(key for family in FAMILIES for key in family.diffusers_defaults)
_BY_CLASS = {family.diffusers_class: family for family in FAMILIES}


def from_name(name: str, config: Mapping[str, Any] | None = None, **overrides: Any) -> Scheduler:
    """The scheduler called `name` (see NAMES), built from a model's scheduler_config.json dict.

    `overrides` are diffusers options (e.g. timestep_spacing="trailing", prediction_type="v_prediction") or
    fields of the scheduler dataclass (e.g. eta for ddim) applied on top of the config and the name's options.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(NAMES)}")
    family, fixed = SCHEDULERS[name]
    return build(family, config or {}, {**fixed, **overrides}, label=name, known_keys=_KNOWN_KEYS)


def from_diffusers_config(config: Mapping[str, Any], **overrides: Any) -> Scheduler:
    """The model's own scheduler: the family of config["_class_name"], with every option from the config."""
    class_name = config.get("_class_name")
    if class_name not in _BY_CLASS:
        raise ValueError(f"scheduler class {class_name!r} is not supported; supported: {', '.join(_BY_CLASS)}")
    return build(_BY_CLASS[class_name], config, overrides, label=class_name, known_keys=_KNOWN_KEYS)


__all__ = [
    "DDIM",
    "DDPM",
    "FAMILIES",
    "LMS",
    "NAMES",
    "PNDM",
    "SCHEDULERS",
    "DPMSolverMultistep",
    "Euler",
    "EulerAncestral",
    "Heun",
    "NoiseSchedule",
    "PREDICTION_TYPES",
    "Scheduler",
    "SchedulerState",
    "UniPC",
    "add_noise",
    "alphas_cumprod",
    "from_diffusers_config",
    "from_name",
    "velocity",
    "with_prediction_type",
]

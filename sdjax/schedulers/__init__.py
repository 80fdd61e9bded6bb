"""Diffusion schedulers as frozen configs plus pure functions, matching diffusers' PyTorch schedulers.

    sched = schedulers.from_name("dpmpp_2m_karras", pipe.scheduler_config)    # A1111-style name
    sched = schedulers.from_diffusers_config(pipe.scheduler_config)          # the model's own scheduler
    state = sched.init(num_steps, latents.shape, max_steps=150)
    x = noise * sched.init_noise_sigma(state)
    for _ in range(sched.num_model_calls(num_steps)):                          # or loop.sample (one jit)
        out = model(sched.scale_model_input(state, x), state.timestep)
        x, state = sched.step(state, out, x, noise=...)                        # noise only if sched.stochastic

Names and their diffusers equivalents (all built from the model's scheduler_config.json):
ddim (DDIMScheduler), pndm (PNDMScheduler, skip_prk_steps=True), pndm_prk (PNDMScheduler with its pseudo
Runge-Kutta warm-up, skip_prk_steps=False), lms / lms_karras (LMSDiscreteScheduler),
euler (EulerDiscreteScheduler), euler_a (EulerAncestralDiscreteScheduler), heun (HeunDiscreteScheduler),
dpm2 / dpm2_karras (KDPM2DiscreteScheduler), dpm2_a / dpm2_a_karras (KDPM2AncestralDiscreteScheduler),
dpmpp_2m / dpmpp_2m_karras (DPMSolverMultistepScheduler, dpmsolver++, order 2), dpmpp_2m_sde /
dpmpp_2m_sde_karras / dpmpp_3m_sde / dpmpp_3m_sde_karras (DPMSolverMultistepScheduler, sde-dpmsolver++,
order 2 or 3), dpmpp_sde / dpmpp_sde_karras (DPMSolverSDEScheduler, Brownian noise from the image's key),
dpmpp_2s_a / dpmpp_2s_a_karras (no diffusers class: k-diffusion's sample_dpmpp_2s_ancestral),
unipc (UniPCMultistepScheduler),
ddpm (DDPMScheduler), lcm (LCMScheduler), tcd (TCDScheduler, eta 0.3).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

from sdjax.schedulers._base import Scheduler, SchedulerState
from sdjax.schedulers._common import PREDICTION_TYPES, NoiseSchedule, add_noise, alphas_cumprod, velocity
from sdjax.schedulers._config import build, with_prediction_type
from sdjax.schedulers.consistency import LCM, TCD
from sdjax.schedulers.ddim import DDIM
from sdjax.schedulers.ddpm import DDPM
from sdjax.schedulers.dpm_sde import DPMSolverSDE
from sdjax.schedulers.dpm_solver import DPMSolverMultistep
from sdjax.schedulers.dpmpp_2s import DPMPP2SAncestral
from sdjax.schedulers.euler import Euler, EulerAncestral, Heun
from sdjax.schedulers.kdpm2 import KDPM2, KDPM2Ancestral
from sdjax.schedulers.lms import LMS
from sdjax.schedulers.pndm import PNDM
from sdjax.schedulers.unipc import UniPC

FAMILIES: tuple[type[Scheduler], ...] = (
    DDIM,
    PNDM,
    LMS,
    Euler,
    EulerAncestral,
    Heun,
    KDPM2,
    KDPM2Ancestral,
    DPMSolverMultistep,
    DPMSolverSDE,
    DPMPP2SAncestral,
    UniPC,
    DDPM,
    LCM,
    TCD,
)


def _dpm_solver(algorithm: str, order: int, *, karras: bool) -> tuple[type[Scheduler], Mapping[str, Any]]:
    return DPMSolverMultistep, {"algorithm_type": algorithm, "solver_order": order, "use_karras_sigmas": karras}


# name -> (family, diffusers options the name fixes on top of the model's config)
SCHEDULERS: Mapping[str, tuple[type[Scheduler], Mapping[str, Any]]] = types.MappingProxyType(
    {
        "ddim": (DDIM, {}),
        "pndm": (PNDM, {"skip_prk_steps": True}),
        "pndm_prk": (PNDM, {"skip_prk_steps": False}),
        "lms": (LMS, {"use_karras_sigmas": False}),
        "lms_karras": (LMS, {"use_karras_sigmas": True}),
        "euler": (Euler, {}),
        "euler_a": (EulerAncestral, {}),
        "heun": (Heun, {}),
        "dpm2": (KDPM2, {"use_karras_sigmas": False}),
        "dpm2_karras": (KDPM2, {"use_karras_sigmas": True}),
        "dpm2_a": (KDPM2Ancestral, {"use_karras_sigmas": False}),
        "dpm2_a_karras": (KDPM2Ancestral, {"use_karras_sigmas": True}),
        "dpmpp_2m": (
            DPMSolverMultistep,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        ),
        "dpmpp_2m_karras": (
            DPMSolverMultistep,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
        "dpmpp_2m_sde": _dpm_solver("sde-dpmsolver++", 2, karras=False),
        "dpmpp_2m_sde_karras": _dpm_solver("sde-dpmsolver++", 2, karras=True),
        "dpmpp_3m_sde": _dpm_solver("sde-dpmsolver++", 3, karras=False),
        "dpmpp_3m_sde_karras": _dpm_solver("sde-dpmsolver++", 3, karras=True),
        "dpmpp_sde": (DPMSolverSDE, {"use_karras_sigmas": False}),
        "dpmpp_sde_karras": (DPMSolverSDE, {"use_karras_sigmas": True}),
        "dpmpp_2s_a": (DPMPP2SAncestral, {"use_karras_sigmas": False}),
        "dpmpp_2s_a_karras": (DPMPP2SAncestral, {"use_karras_sigmas": True}),
        "unipc": (UniPC, {}),
        "ddpm": (DDPM, {}),
        "lcm": (LCM, {}),
        "tcd": (TCD, {}),
    }
)
NAMES = tuple(SCHEDULERS)
# A1111's sampler name of each scheduler (its web UI's list; PNDM is its "PLMS"); A1111 has no pndm_prk
A1111_NAMES: Mapping[str, str] = types.MappingProxyType(
    {
        "ddim": "DDIM",
        "pndm": "PLMS",
        "lms": "LMS",
        "lms_karras": "LMS Karras",
        "euler": "Euler",
        "euler_a": "Euler a",
        "heun": "Heun",
        "dpm2": "DPM2",
        "dpm2_karras": "DPM2 Karras",
        "dpm2_a": "DPM2 a",
        "dpm2_a_karras": "DPM2 a Karras",
        "dpmpp_2m": "DPM++ 2M",
        "dpmpp_2m_karras": "DPM++ 2M Karras",
        "dpmpp_2m_sde": "DPM++ 2M SDE",
        "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
        "dpmpp_3m_sde": "DPM++ 3M SDE",
        "dpmpp_3m_sde_karras": "DPM++ 3M SDE Karras",
        "dpmpp_sde": "DPM++ SDE",
        "dpmpp_sde_karras": "DPM++ SDE Karras",
        "dpmpp_2s_a": "DPM++ 2S a",
        "dpmpp_2s_a_karras": "DPM++ 2S a Karras",
        "unipc": "UniPC",
        "ddpm": "DDPM",
        "lcm": "LCM",
        "tcd": "TCD",
    }
)


def _folded(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


_BY_FOLDED = {_folded(key): key for key in NAMES} | {_folded(label): key for key, label in A1111_NAMES.items()}


def resolve_name(name: str) -> str:
    """The sdjax name (one of NAMES) of `name`: an sdjax name or A1111's sampler name ("DPM++ 2M Karras",
    "Euler a"), in any case, with spaces or underscores; a one-line error naming both lists otherwise."""
    key = _BY_FOLDED.get(_folded(name)) if isinstance(name, str) else None
    if key is None:
        raise ValueError(
            f"unknown scheduler {name!r}; choose one of {', '.join(NAMES)} or A1111's "
            f"{', '.join(repr(label) for label in A1111_NAMES.values())}"
        )
    return key


def a1111_name(scheduler: Scheduler) -> str:
    """A1111's sampler name of a scheduler (built by `from_name` or `from_diffusers_config`): that of the
    first name whose family and fixed options it has (sdjax's name where A1111 has none: pndm_prk); else
    its diffusers class name."""
    for key, (family, fixed) in SCHEDULERS.items():
        if type(scheduler) is family and all(getattr(scheduler, k, v) == v for k, v in fixed.items()):
            return A1111_NAMES.get(key, key)
    return type(scheduler).diffusers_class


_KNOWN_KEYS = frozenset(key for family in FAMILIES for key in family.diffusers_defaults)
_BY_CLASS = {family.diffusers_class: family for family in FAMILIES}


def from_name(name: str, config: Mapping[str, Any] | None = None, **overrides: Any) -> Scheduler:
    """The scheduler called `name` (see NAMES; A1111's sampler names too, see `resolve_name`), built from a
    model's scheduler_config.json dict.

    `overrides` are diffusers options (e.g. timestep_spacing="trailing", prediction_type="v_prediction") or
    fields of the scheduler dataclass (e.g. eta for ddim) applied on top of the config and the name's options.
    """
    name = resolve_name(name)
    family, fixed = SCHEDULERS[name]
    return build(family, config or {}, {**fixed, **overrides}, label=name, known_keys=_KNOWN_KEYS)


def from_diffusers_config(config: Mapping[str, Any], **overrides: Any) -> Scheduler:
    """The model's own scheduler: the family of config["_class_name"], with every option from the config."""
    class_name = config.get("_class_name")
    if class_name not in _BY_CLASS:
        raise ValueError(f"scheduler class {class_name!r} is not supported; supported: {', '.join(_BY_CLASS)}")
    return build(_BY_CLASS[class_name], config, overrides, label=class_name, known_keys=_KNOWN_KEYS)


__all__ = [
    "A1111_NAMES",
    "DDIM",
    "DDPM",
    "FAMILIES",
    "LMS",
    "NAMES",
    "PNDM",
    "SCHEDULERS",
    "DPMSolverMultistep",
    "DPMSolverSDE",
    "DPMPP2SAncestral",
    "Euler",
    "EulerAncestral",
    "Heun",
    "KDPM2",
    "KDPM2Ancestral",
    "LCM",
    "TCD",
    "NoiseSchedule",
    "PREDICTION_TYPES",
    "Scheduler",
    "SchedulerState",
    "UniPC",
    "a1111_name",
    "add_noise",
    "alphas_cumprod",
    "resolve_name",
    "from_diffusers_config",
    "from_name",
    "velocity",
    "with_prediction_type",
]

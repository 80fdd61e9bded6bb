"""The training noise schedule shared by every scheduler, and the host-side (numpy) tables built from it.

Everything here runs on the host in numpy, once per (config, step count), and reproduces diffusers'
`__init__`/`set_timesteps` arithmetic: float32 betas exactly as `torch.linspace` makes them, alphas_cumprod
accumulated in float64 and rounded to float32 (as `torch.cumprod` does on CPU), timestep spacings and
Karras sigmas in float64 as diffusers' numpy code. Only the resulting small tables enter JAX programs.
The one traced function is `add_noise`, the forward process used for training.

Timesteps are in training-step units (0 .. num_train_timesteps-1, possibly fractional); sigmas are the
noise-to-signal ratio sqrt((1 - alphas_cumprod) / alphas_cumprod), dimensionless.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The diffusion process the model was trained with, and how inference timesteps are picked from it.

    Field names and meanings are diffusers' scheduler_config.json keys. `trained_betas` is a tuple (hashable)
    of num_train_timesteps floats or None.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported; choose one of {BETA_SCHEDULES}")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"trained_betas has {len(self.trained_betas)} values, expected {self.num_train_timesteps}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing {self.timestep_spacing!r} is not supported; choose one of {TIMESTEP_SPACINGS}"
            )


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32[steps] bit-identical to torch.linspace(start, end, steps, dtype=torch.float32) on CPU.

    torch evaluates start + i*step for the first half and end - (steps-1-i)*step for the second, with a
    fused multiply-add (one rounding), step = (end - start) / (steps - 1) in float32.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    exact = np.where(i < steps // 2, np.float64(start32) + i * step, np.float64(end32) - (steps - 1 - i) * step)
    return exact.astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """squaredcos_cap_v2: betas discretising alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return np.array(betas, np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last alphas_cumprod is exactly 0 (arXiv 2305.08891, algorithm 1), in float32 like diffusers."""
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(1.0 - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod of a float32 CPU tensor: accumulated in float64, each output rounded to float32."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def betas(schedule: NoiseSchedule) -> np.ndarray:
    """float32[num_train_timesteps]: the variance added at each training step."""
    t = schedule.num_train_timesteps
    if schedule.trained_betas is not None:
        out = np.asarray(schedule.trained_betas, np.float32)
    elif schedule.beta_schedule == "linear":
        out = _torch_linspace_f32(schedule.beta_start, schedule.beta_end, t)
    elif schedule.beta_schedule == "scaled_linear":
        out = _torch_linspace_f32(schedule.beta_start**0.5, schedule.beta_end**0.5, t) ** 2
    else:
        out = _cosine_betas(t)
    if schedule.rescale_betas_zero_snr:
        out = _rescale_zero_terminal_snr(out)
    return out


@functools.lru_cache(maxsize=32)
def alphas_cumprod(schedule: NoiseSchedule, zero_snr_floor: bool = False) -> np.ndarray:
    """float32[num_train_timesteps] (read-only): signal fraction alpha_bar_t = prod_{s<=t} (1 - beta_s).

    `zero_snr_floor`: with rescale_betas_zero_snr, replace the final 0 by 2**-24 (what diffusers' sigma-based
    schedulers do so that the largest sigma stays finite).
    """
    out = _cumprod_f32(1.0 - betas(schedule))
    if zero_snr_floor and schedule.rescale_betas_zero_snr:
        out[-1] = 2.0**-24
    out.flags.writeable = False
    return out


def train_sigmas(alphas_cumprod_: np.ndarray) -> np.ndarray:
    """float32[T]: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep t."""
    ac = alphas_cumprod_.astype(np.float32)
    return np.sqrt(((1 - ac) / ac).astype(np.float64)).astype(np.float32)


def spaced_timesteps(
    schedule: NoiseSchedule, num_steps: int, *, round_linspace: bool = True, linspace_dtype=np.float32
) -> np.ndarray:
    """float64[num_steps], descending: the inference timesteps of DDIM, DDPM, PNDM, LMS, Euler and Heun.

    leading: multiples of T // n plus steps_offset; trailing: T - k*T/n rounded, minus 1; linspace:
    n points spread evenly over [0, T-1] (rounded for the discrete-time schedulers, `round_linspace=False`
    keeps the fractional values the sigma-based schedulers use: float32, or float64 for DPM++ SDE's).
    """
    t, n = schedule.num_train_timesteps, num_steps
    if schedule.timestep_spacing == "linspace":
        if round_linspace:
            return np.linspace(0, t - 1, n).round()[::-1].astype(np.float64)
        return np.linspace(0, t - 1, n, dtype=linspace_dtype)[::-1].astype(np.float64)
    if schedule.timestep_spacing == "leading":
        return (np.arange(0, n) * (t // n)).round()[::-1].astype(np.float64) + schedule.steps_offset
    return np.round(np.arange(t, 0, -t / n)).astype(np.float64) - 1


def spaced_timesteps_multistep(schedule: NoiseSchedule, num_steps: int, last_timestep: int) -> np.ndarray:
    """float64[num_steps], descending: DPM-Solver/UniPC spacing (n+1 points with the last one dropped)."""
    t, n = schedule.num_train_timesteps, num_steps
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.float64)
    if schedule.timestep_spacing == "leading":
        ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.float64) + schedule.steps_offset
    return np.arange(last_timestep, 0, -t / n).round().astype(np.float64) - 1


def interp_sigmas(sigmas_train: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """float64: sigma at (possibly fractional) timesteps, linearly interpolated between training steps."""
    return np.interp(timesteps, np.arange(len(sigmas_train)), sigmas_train.astype(np.float64))


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """float64[num_steps]: sigma_max -> sigma_min evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, sigmas_train: np.ndarray) -> np.ndarray:
    """float64: the fractional training timestep of each sigma (linear interpolation in log sigma)."""
    log_sigmas = np.log(sigmas_train.astype(np.float32))  # float32, as in diffusers
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    # the denominator is a float32 difference in diffusers too
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def dynamic_threshold(x0: jnp.ndarray, ratio: float, max_value: float) -> jnp.ndarray:
    """diffusers' dynamic thresholding (Imagen, Saharia et al. 2022) of x0 predictions [B, ...]: per sample,
    s = the `ratio` quantile of |x0| (linear interpolation, as torch.quantile), clamped to [1, max_value];
    x0 is clipped to [-s, s] and divided by s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value).reshape(-1, *[1] * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def check_final_sigmas_type(final_sigmas_type: str):
    """Raises for a final_sigmas_type other than "zero" / "sigma_min"."""
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type {final_sigmas_type!r} is not supported; choose 'zero' or 'sigma_min'")


def pad(values: np.ndarray, length: int, fill: float = 0.0) -> np.ndarray:
    """float32[length]: `values` followed by `fill`."""
    out = np.full((length,), fill, np.float32)
    out[: len(values)] = values
    return out


def _alpha_bar_like(schedule: NoiseSchedule, timesteps, sample):
    """alpha_bar at each row's timestep, in sample's dtype, shaped to broadcast against sample (B, 1, ...)."""
    ac = jnp.asarray(alphas_cumprod(schedule))[jnp.asarray(timesteps)].astype(sample.dtype)
    return ac.reshape(ac.shape + (1,) * (sample.ndim - ac.ndim))


def add_noise(schedule: NoiseSchedule, original, noise, timesteps):
    """Forward diffusion q(x_t | x_0) at integer training timesteps, as diffusers' DDPM/DDIM `add_noise`.

    Args:
      original: f32[B, ...] clean samples (e.g. latents BHWC).
      noise: f32[B, ...] standard normal noise, same shape.
      timesteps: int[B] training timesteps in [0, num_train_timesteps).

    Returns sqrt(alpha_bar_t) * original + sqrt(1 - alpha_bar_t) * noise, in original's dtype.
    """
    ac = _alpha_bar_like(schedule, timesteps, original)
    return ac**0.5 * original + (1 - ac) ** 0.5 * noise


def velocity(schedule: NoiseSchedule, original, noise, timesteps):
    """The v-prediction target at integer training timesteps, as diffusers' `get_velocity`:
    sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * original, in original's dtype (shapes as `add_noise`)."""
    ac = _alpha_bar_like(schedule, timesteps, original)
    return ac**0.5 * noise - (1 - ac) ** 0.5 * original

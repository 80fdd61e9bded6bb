"""The benchmark's models: random-weight pipelines of the real architectures (`sdjax.testing`), saved once
as diffusers folders under the cache directory (`$SDJAX_BENCH_DIR`, default ~/.cache/sdjax/bench) so that
both frameworks load the same files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sdjax.convert.diffusers_folder import model_components, save_component, save_folder_index
from sdjax.memory import release_free_memory
from sdjax.testing import ARCHS, abstract_pipeline, random_like

__all__ = ["ARCHS", "cache_dir", "controlnet_config", "controlnet_folder", "model_folder", "random_controlnet_folder"]


def cache_dir() -> Path:
    return Path(os.environ.get("SDJAX_BENCH_DIR") or Path.home() / ".cache" / "sdjax" / "bench").expanduser()


def model_folder(arch: str) -> Path:
    """The cached diffusers folder of `arch`, built on first use (written to a temporary name, then renamed)."""
    target = cache_dir() / arch
    if (target / "model_index.json").is_file():
        return target
    tmp = target.with_name(f".{arch}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shapes = abstract_pipeline(arch)
    # one component's random weights in memory at a time (SDXL's UNet alone is 10 GB in float32)
    for seed, spec in enumerate(model_components(shapes)):
        params = random_like(shapes.params[spec.folder], seed)
        save_component(tmp, spec, getattr(shapes, spec.folder), params)
        del params
    save_folder_index(tmp, shapes)
    tmp.rename(target)
    release_free_memory()  # the drawn weights' pages: the parent stays small while the workers run
    return target


def random_controlnet_folder(model: str | Path, target: Path) -> Path:
    """A diffusers ControlNet folder at `target` with random weights (every parameter, the output
    convolutions too, so its residuals are not zero) of the ControlNet diffusers' from_unet makes of the
    UNet of `model` (a diffusers folder): lllyasviel's layout for SD 1.5 and SD 2.1 (`controlnet_config`).
    Built once."""
    import jax

    import sdjax
    from sdjax.convert.diffusers_folder import abstract_params
    from sdjax.nn.controlnet import ControlNetModel
    from sdjax.testing import random_like

    if (target / "config.json").is_file():
        return target
    module = ControlNetModel(controlnet_config(sdjax.load_pipeline(model, weights=False)))
    params = jax.tree.map(jax.numpy.asarray, random_like(abstract_params(module), seed=17))
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sdjax.ControlNet(module, params).save_pretrained(tmp)
    tmp.rename(target)
    return target


def controlnet_config(pipe):
    """The ControlNetConfig diffusers' from_unet makes of `pipe`'s UNet, with a condition embedding that
    downscales by `pipe`'s VAE factor: the first log2(factor) + 1 of from_unet's channel counts (all four
    for SD's 8x; two for the test suite's 2x `micro` model)."""
    from sdjax.nn.controlnet import ControlNetConfig

    channels = ControlNetConfig.conditioning_embedding_out_channels[: pipe.vae_scale_factor.bit_length()]
    return ControlNetConfig.from_unet(pipe.unet.config, conditioning_embedding_out_channels=channels)


def controlnet_folder(arch: str) -> Path:
    """The cached random ControlNet of architecture `arch`'s UNet (see `random_controlnet_folder`)."""
    return random_controlnet_folder(model_folder(arch), cache_dir() / f"{arch}-controlnet")

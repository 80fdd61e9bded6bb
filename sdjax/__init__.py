"""sdjax: Stable Diffusion in JAX/Flax.

Parameters are plain pytrees kept apart from the (stateless) Flax modules; images and latents are NHWC.
"""

from sdjax import control_images
from sdjax.pipeline import ControlNet, StableDiffusionPipeline, load_controlnet, load_pipeline
from sdjax.request import GenerateOptions

__all__ = [
    "ControlNet",
    "control_images",
    "GenerateOptions",
    "StableDiffusionPipeline",
    "load_controlnet",
    "load_pipeline",
]
__version__ = "0.1.0"

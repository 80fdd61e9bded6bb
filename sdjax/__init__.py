"""sdjax: Stable Diffusion in JAX/Flax.

Parameters are plain pytrees kept apart from the (stateless) Flax modules; images and latents are NHWC.
"""

from sdjax.pipeline import StableDiffusionPipeline, load_pipeline
from sdjax.request import GenerateOptions

__all__ = ["GenerateOptions", "StableDiffusionPipeline", "load_pipeline"]
__version__ = "0.1.0"

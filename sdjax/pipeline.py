"""A Stable Diffusion model as modules + plain parameter pytrees: loading, assembling and generating.

The formats in `sdjax.convert` return model parts (`ModelParts`); the pipeline's constructors and methods
assemble them, and `generate` runs a request (`sdjax.request`) through the compiled program
(`sdjax.generate`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert import controlnet_file, diffusers_folder, single_file
from sdjax.convert.lora import lora_adapter
from sdjax.convert.parts import ModelParts
from sdjax.convert.textual_inversion import EmbeddingError, add_embedding, read_embedding, read_sdxl_embedding
from sdjax.generate import draw_images
from sdjax.memory import release_free_memory
from sdjax.nn.config_utils import resolve_dtype
from sdjax.nn.controlnet import ControlNetConfig, ControlNetModel, params_from_unet
from sdjax.nn.lora import component_scales, merge_lora
from sdjax.request import prepare
from sdjax.schedulers import with_prediction_type

# The bundled demo model (64x64 emoji, trained by sdjax's own train/; see the README): the default model.
DEMO_MODEL = Path(__file__).resolve().parent / "data" / "demo"


@dataclasses.dataclass(frozen=True)
class StableDiffusionPipeline(ModelParts):
    """The modules (stateless Flax definitions) and their parameters, kept apart (see `ModelParts`), with
    generation and the loaders that return new pipelines (this one is never changed)."""

    @classmethod
    def from_parts(cls, parts: ModelParts) -> StableDiffusionPipeline:
        """The pipeline of model parts read by `sdjax.convert`."""
        return cls(**{f.name: getattr(parts, f.name) for f in dataclasses.fields(ModelParts)})

    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, **options):
        """Text-to-image, img2img (`image`) or inpainting (`image` + `mask_image`) -> uint8 (B, H, W, 3).

        One compiled program runs text encoding, the whole sampling loop and the VAE decode. Prompts, seed,
        guidance, guidance_rescale, strength and the step count (up to `max_steps`, by default the next
        multiple of 50) are traced: changing them does not recompile.

        Args:
          prompt, negative_prompt: a string or a list; A1111 emphasis `(word:1.3)`, `(word)`, `[word]` and
            `BREAK`; prompts over 75 tokens are encoded as several 77-token windows (sdjax.prompts). One
            negative prompt is used for every prompt.
          options: the fields of `sdjax.GenerateOptions` as keyword arguments (num_inference_steps,
            guidance_scale, scheduler, height, width, num_images_per_prompt, seed, latents, image,
            strength, mask_image, guidance_rescale, clip_skip, max_steps, micro_batch_size, mesh, loras,
            vae_tiling), documented there. Place the parameters once with `on_mesh` to avoid copying them
            on every call on several devices.
        """
        plan, inputs = prepare(self, prompt, negative_prompt, **options)
        return draw_images(self, plan, inputs)

    def on_mesh(self, mesh) -> StableDiffusionPipeline:
        """A new pipeline whose parameters live on `mesh` (a Mesh or a spec such as "data=8" or
        "data=2,fsdp=4"): replicated, or split over "fsdp" by `sdjax.sharding.DEFAULT_RULES`."""
        from sdjax import sharding

        mesh = sharding.make_mesh(mesh) if isinstance(mesh, str) else mesh
        return dataclasses.replace(self, params=sharding.shard_params(self.params, mesh))

    def with_vae(self, vae: str | Path, *, weights: bool = True) -> StableDiffusionPipeline:
        """A new pipeline with the VAE read from an LDM-layout `.safetensors` file or a diffusers VAE folder
        (see `sdjax.convert.single_file.load_vae`), in this pipeline's dtype; `weights=False`: its params as
        shapes (see `load_pipeline`)."""
        module, params = single_file.load_vae(vae, self.vae.config, self.dtype, weights=weights)
        return dataclasses.replace(self, vae=module, params={**self.params, "vae": params})

    def load_lora(self, path: str | Path, scale: float | dict[str, float] = 1.0) -> StableDiffusionPipeline:
        """A new pipeline with a LoRA merged into the UNet and text-encoder weights (this one is unchanged).

        Formats: kohya-ss/A1111 (`lora_unet_*`, `lora_te_*`) and diffusers/PEFT (`unet.*.lora_A/B`), linear
        and conv layers. `scale` is one float or {"unet": s, "text_encoder": s}. Parameters are traced, so
        generating with another LoRA or scale does not recompile.
        """
        component_scales(scale)  # a bad scale is refused before the file is read
        return dataclasses.replace(self, params=merge_lora(self.params, lora_adapter(self, path), scale))

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> StableDiffusionPipeline:
        """A new pipeline that knows a textual-inversion embedding (A1111 `.pt`/`.safetensors` or diffusers
        `learned_embeds`; for SDXL a `clip_l`/`clip_g` pair, one set of vectors per text encoder) under `token`
        (default: the file's own trigger word, else its file name)."""
        if self.is_sdxl:
            trigger, clip_l, clip_g = read_sdxl_embedding(path, token)
            encoders = {"": clip_l, "_2": clip_g} if self.text_encoder is not None else {"_2": clip_g}
        else:
            trigger, vectors = read_embedding(path, token)
            encoders = {"": vectors}
        changes, params = {}, dict(self.params)
        for suffix, vectors in encoders.items():
            if vectors is None:
                raise EmbeddingError(f"{path} has no clip_l vectors for the first text encoder")
            name = f"text_encoder{suffix}"
            try:
                tokenizer, module, params[name] = add_embedding(
                    getattr(self, f"tokenizer{suffix}"), getattr(self, name), params[name], trigger, vectors
                )
            except EmbeddingError as err:
                raise EmbeddingError(f"{path}: {err}") from None
            changes.update({f"tokenizer{suffix}": tokenizer, name: module})
        return dataclasses.replace(self, params=params, **changes)

    def save_single_file(self, path: str | Path, dtype=None) -> Path:
        """Writes one `.safetensors` checkpoint in the original CompVis/Stability layout (A1111, ComfyUI)."""
        return single_file.save_single_file(self, path, dtype)

    def save_pretrained(self, directory: str | Path, dtype=None) -> Path:
        """Writes a diffusers-format folder that diffusers/transformers `from_pretrained` load.

        Weights are stored in `dtype` (default: the pipeline's dtype) under the standard file names.
        """
        return diffusers_folder.save_folder(Path(directory), self, dtype)


def load_pipeline(
    path: str | Path | None = None,
    dtype=jnp.float32,
    variant: str | None = None,
    *,
    config: str | Path | None = None,
    prediction_type: str | None = None,
    vae: str | Path | None = None,
    weights: bool = True,
) -> StableDiffusionPipeline:
    """Loads a Stable Diffusion model (SD 1.x, 2.x, inpainting, SDXL base and refiner) without torch.

    Args:
      path: by default the bundled demo model (`DEMO_MODEL`: 64x64 emoji, "an emoji of red apple"); else a
        diffusers-format folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
        `scheduler/`), or a single-file checkpoint in the original CompVis/Stability layout (`.safetensors`;
        `.ckpt`/`.pt` only through torch's weights-only loader).
      dtype: parameter and compute dtype: float32 (parity mode), bfloat16 or float16.
      variant: weight-file variant to read from a folder (e.g. "fp16"); by default the plain files.
      config: single files only: a diffusers-format folder (configs, tokenizer, scheduler; no weights
        needed) that decides the architecture; default: the standard SD 1.x/2.x one detected from the file.
      prediction_type: "epsilon", "v_prediction" or "sample", replacing the scheduler config's. Single
        files cannot show it: the default is diffusers' (epsilon, except v_prediction for 768px SD 2.x).
      vae: a VAE replacing the model's: an LDM-layout `.safetensors` file (e.g.
        vae-ft-mse-840000-ema-pruned) or a diffusers VAE folder.
      weights: False reads no tensor: the params are `jax.ShapeDtypeStruct`s, enough to compile programs
        (`sdjax.generate.compile_generate`) before the weights are read, so that the compiler's memory and
        the weights are never resident together; call again with weights=True to run them. A folder's
        configs, tokenizer and scheduler are read; a single `.safetensors` file's header is read and
        checked (a `.ckpt` pickle has no header: ValueError); so is a `vae` file's.
    """
    if path is None:
        if not (DEMO_MODEL / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the bundled demo model is missing from {DEMO_MODEL}: reinstall sdjax, or pass the path of a "
                "Stable Diffusion model"
            )
        path = DEMO_MODEL
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"model path {root} does not exist")
    if root.is_file():
        parts = single_file.load_single_file(
            root, config=config, dtype=dtype, prediction_type=prediction_type, vae=vae, weights=weights
        )
        release_free_memory()  # the conversion's freed buffers (see sdjax.memory)
        return StableDiffusionPipeline.from_parts(parts)
    if config is not None:
        raise ValueError("config= is for single-file checkpoints; a diffusers folder carries its own configs")
    parts = diffusers_folder.load_folder(root, dtype, variant, weights=weights)
    scheduler_config = with_prediction_type(parts.scheduler_config, prediction_type)
    pipe = StableDiffusionPipeline.from_parts(dataclasses.replace(parts, scheduler_config=scheduler_config))
    if vae is not None:
        pipe = pipe.with_vae(vae, weights=weights)
    release_free_memory()  # the conversion's freed buffers (see sdjax.memory)
    return pipe


@dataclasses.dataclass(frozen=True)
class ControlNet:
    """A ControlNet: its module (a stateless Flax definition) and its parameters."""

    module: ControlNetModel
    params: dict

    @property
    def config(self) -> ControlNetConfig:
        return self.module.config

    @classmethod
    def from_unet(
        cls,
        pipe: StableDiffusionPipeline,
        seed: int = 0,
        *,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
    ) -> ControlNet:
        """A new float32 ControlNet of `pipe`'s UNet, to be trained (diffusers' `ControlNetModel.from_unet`):
        the UNet's encoder copied, the output convolutions zero (its residuals start at 0), the condition
        embedding drawn from `seed`. The embedding's 2^(len - 1) must be the VAE's downscale factor."""
        config = ControlNetConfig.from_unet(
            pipe.unet.config,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
        )
        if config.condition_downscale != pipe.vae_scale_factor:
            raise ValueError(
                f"conditioning_embedding_out_channels {tuple(conditioning_embedding_out_channels)} downscale "
                f"condition images {config.condition_downscale}x but the VAE's factor is {pipe.vae_scale_factor}: "
                f"give {int(np.log2(pipe.vae_scale_factor)) + 1} channel counts"
            )
        module = ControlNetModel(config)
        unet_params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pipe.params["unet"])
        return cls(module, params_from_unet(module, unet_params, jax.random.key(seed)))

    def save_pretrained(self, directory: str | Path, dtype=None) -> Path:
        """Writes a diffusers ControlNet folder (config.json, diffusion_pytorch_model.safetensors) that
        diffusers' `ControlNetModel.from_pretrained` loads; weights in `dtype` (default: this one's)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        store = None if dtype is None else resolve_dtype(dtype)
        diffusers_folder.save_component(out, diffusers_folder.CONTROLNET, self.module, self.params, store)
        return out


def load_controlnet(
    path: str | Path, dtype=jnp.float32, config: str | Path | None = None, *, weights: bool = True
) -> ControlNet:
    """A ControlNet, parameters in `dtype` (float32, bfloat16 or float16), from a diffusers folder
    (config.json + diffusion_pytorch_model.safetensors) or a single file as users download them
    (`control_v11p_sd15_canny.safetensors` or `.pth`; lllyasviel's `control_model.*` names, or bare): its
    architecture is the SD 1.5 or SD 2.1 ControlNet, told by its cross-attention width, unless `config`
    names a folder with its config.json. `weights=False` reads only a folder's config.json or a
    `.safetensors` file's header (names and shapes checked): the params are `jax.ShapeDtypeStruct`s, enough
    to compile a program (`compile_generate`) before the weights are read."""
    module, params = controlnet_file.load_controlnet(Path(path), dtype, config, weights=weights)
    release_free_memory()
    return ControlNet(module, params)


__all__ = ["DEMO_MODEL", "ControlNet", "StableDiffusionPipeline", "load_controlnet", "load_pipeline"]

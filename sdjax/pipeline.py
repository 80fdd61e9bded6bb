"""A Stable Diffusion model as modules + plain parameter pytrees: loading and saving diffusers folders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sdjax.convert.diffusers_folder import (
    TEXT_ENCODER,
    UNET,
    VAE,
    abstract_component,
    load_component,
    save_component,
)
from sdjax.convert.textual_inversion import restore_multi_vector
from sdjax.memory import release_free_memory
from sdjax.nn.clip import CLIPTextModel
from sdjax.nn.config_utils import read_json, resolve_dtype
from sdjax.nn.unet import UNet2DConditionModel
from sdjax.nn.vae import AutoencoderKL
from sdjax.tokenizer import CLIPTokenizer

# The bundled demo model (64x64 emoji, trained by sdjax's own train/; see the README): the default model.
DEMO_MODEL = Path(__file__).resolve().parent / "data" / "demo"


@dataclasses.dataclass(frozen=True)
class StableDiffusionPipeline:
    """The modules (stateless Flax definitions) and their parameters, kept apart.

    `params` is {"unet": ..., "vae": ..., "text_encoder": ...}, nested dicts of arrays whose paths joined
    with "." are the diffusers/transformers state-dict names. Apply a module functionally, e.g.
    `pipe.unet.apply({"params": pipe.params["unet"]}, latents_BHWC, timesteps_B, context_BLD)`.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    params: dict[str, Any]
    dtype: jnp.dtype
    source: Path | None = None  # the folder it was loaded from (tokenizer files are copied from it)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return self.vae.config.downscale

    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler=None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int = 0,
        latents=None,
        image=None,
        strength: float = 0.8,
        mask_image=None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        max_steps: int | None = None,
        micro_batch_size: int = 1,
        mesh="all",
        loras=None,
        vae_tiling: bool = False,
    ):
        """Text-to-image, img2img (`image`) or inpainting (`image` + `mask_image`) -> uint8 (B, H, W, 3).

        One compiled program runs text encoding, the whole sampling loop and the VAE decode. Prompts, seed,
        guidance, guidance_rescale, strength and the step count (up to `max_steps`, by default the next
        multiple of 50) are traced: changing them does not recompile.

        Args:
          prompt, negative_prompt: a string or a list; A1111 emphasis `(word:1.3)`, `(word)`, `[word]` and
            `BREAK`; prompts over 75 tokens are encoded as several 77-token windows (sdjax.prompts).
          scheduler: a name from `sdjax.schedulers.NAMES` (e.g. "euler_a", "dpmpp_2m_karras"), a Scheduler,
            or None for the model's own scheduler config.
          height, width: pixels, multiples of the VAE factor (8); default: the init image's size, else the
            model's sample size.
          num_images_per_prompt: images per prompt; B = len(prompts) * num_images_per_prompt.
          seed: image k of the call uses seed + k (A1111's convention), whatever the batch size.
          latents: optional (B, H/8, W/8, 4) NHWC standard-normal noise: the initial latents before scaling by
            the scheduler's initial sigma (txt2img), or the noise added to the init image's latents.
          image, mask_image: paths, PIL images or uint8 (H, W[, C]) arrays; the mask is white where to
            repaint. A list (or a uint8 (N, H, W, C) array) gives one per prompt, all of one size. 9-channel
            inpainting UNets work as diffusers' StableDiffusionInpaintPipeline; regular UNets blend the
            latents with the re-noised init image after every step (diffusers' behaviour for them).
          strength: img2img/inpaint denoising strength in [0, 1].
          guidance_rescale, clip_skip: as diffusers (clip_skip=1 is A1111's "Clip skip: 2").
          micro_batch_size: images per UNet call. 1 (default) makes each image bit-identical whatever the
            batch size; larger groups are faster on GPUs/TPUs and change images only by float rounding.
          mesh: "all" (default: the batch split over every device; plain on a single device), a spec such
            as "data=2,fsdp=4", a `jax.sharding.Mesh`, or None (one device). Images are bit-identical
            whatever the mesh. Place the parameters once with `pipe.on_mesh(mesh)` to avoid copying them on
            every call.
          loras: unmerged LoRAs applied inside the compiled program, [(file or adapter, scale), ...]; a scale
            is a float or {"unet": a, "text_encoder": b}. Other scales, or other LoRAs of the same shapes,
            do not recompile. (`load_lora` merges instead, which does not recompile either.)
          vae_tiling: decode the latents in overlapping 512-pixel tiles, as diffusers' `enable_vae_tiling`:
            bounded memory for large images (SD 1.5 at 1024x1024 and above).
        """
        from sdjax.generate import generate

        return generate(
            self,
            prompt,
            negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            height=height,
            width=width,
            num_images_per_prompt=num_images_per_prompt,
            seed=seed,
            latents=latents,
            image=image,
            strength=strength,
            mask_image=mask_image,
            guidance_rescale=guidance_rescale,
            clip_skip=clip_skip,
            max_steps=max_steps,
            micro_batch_size=micro_batch_size,
            mesh=mesh,
            loras=loras,
            vae_tiling=vae_tiling,
        )

    def on_mesh(self, mesh) -> StableDiffusionPipeline:
        """A new pipeline whose parameters live on `mesh` (a Mesh or a spec such as "data=8" or
        "data=2,fsdp=4"): replicated, or split over "fsdp" by `sdjax.sharding.DEFAULT_RULES`."""
        from sdjax import sharding

        mesh = sharding.make_mesh(mesh) if isinstance(mesh, str) else mesh
        return dataclasses.replace(self, params=sharding.shard_params(self.params, mesh))

    def with_vae(self, vae: str | Path) -> StableDiffusionPipeline:
        """A new pipeline with the VAE read from an LDM-layout `.safetensors` file or a diffusers VAE folder."""
        from sdjax.convert.single_file import replace_vae

        return replace_vae(self, vae)

    def load_lora(self, path: str | Path, scale: float | dict[str, float] = 1.0) -> StableDiffusionPipeline:
        """A new pipeline with a LoRA merged into the UNet and text-encoder weights (this one is unchanged).

        Formats: kohya-ss/A1111 (`lora_unet_*`, `lora_te_*`) and diffusers/PEFT (`unet.*.lora_A/B`), linear
        and conv layers. `scale` is one float or {"unet": s, "text_encoder": s}. Parameters are traced, so
        generating with another LoRA or scale does not recompile.
        """
        from sdjax.convert.lora import load_lora

        return load_lora(self, path, scale)

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> StableDiffusionPipeline:
        """A new pipeline that knows a textual-inversion embedding (A1111 `.pt`/`.safetensors` or diffusers
        `learned_embeds`) under `token` (default: the file's own trigger word, else its file name)."""
        from sdjax.convert.textual_inversion import load_textual_inversion

        return load_textual_inversion(self, path, token)

    def save_single_file(self, path: str | Path, dtype=None) -> Path:
        """Writes one `.safetensors` checkpoint in the original CompVis/Stability layout (A1111, ComfyUI)."""
        from sdjax.convert.single_file import save_single_file

        return save_single_file(self, path, dtype)

    def save_pretrained(self, directory: str | Path, dtype=None) -> Path:
        """Writes a diffusers-format folder that diffusers/transformers `from_pretrained` load.

        Weights are stored in `dtype` (default: the pipeline's dtype) under the standard file names.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        store = None if dtype is None else resolve_dtype(dtype)
        for spec, module in ((UNET, self.unet), (VAE, self.vae), (TEXT_ENCODER, self.text_encoder)):
            save_component(out, spec, module, self.params[spec.folder], store)
        self.tokenizer.save(out / "tokenizer")
        (out / "scheduler").mkdir(exist_ok=True)
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2) + "\n")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", self.scheduler_config.get("_class_name", "PNDMScheduler")],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return out


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
    """Loads a Stable Diffusion model (SD 1.x, 2.x, inpainting) without torch.

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
      weights: False reads only the configs, tokenizer and scheduler of a diffusers folder: the params are
        `jax.ShapeDtypeStruct`s, enough to compile programs (`sdjax.generate.compile_generate`) before the
        weights are read, so that the compiler's memory (~0.7 GiB for SD 1.5) and the weights are never
        resident together; call again with weights=True to run them.
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
        if not weights:
            raise ValueError("weights=False needs a diffusers folder; a single-file checkpoint is read whole")
        from sdjax.convert.single_file import load_single_file

        pipe = load_single_file(root, config=config, dtype=dtype, prediction_type=prediction_type, vae=vae)
        release_free_memory()  # the conversion's freed buffers (see sdjax.memory)
        return pipe
    if config is not None:
        raise ValueError("config= is for single-file checkpoints; a diffusers folder carries its own configs")
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
    dtype = resolve_dtype(dtype)
    modules, params = {}, {}
    for spec in (UNET, VAE, TEXT_ENCODER):
        if weights:
            modules[spec.folder], params[spec.folder] = load_component(root, spec, dtype, variant)
        else:
            modules[spec.folder], params[spec.folder] = abstract_component(root, spec, dtype)
    for folder in ("tokenizer", "scheduler"):
        if not (root / folder).is_dir():
            raise FileNotFoundError(f"{root} has no '{folder}/' component folder")
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    if prediction_type is not None:
        from sdjax.convert.single_file import PREDICTION_TYPES

        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
        scheduler_config = {**scheduler_config, "prediction_type": prediction_type}
    pipe = StableDiffusionPipeline(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=restore_multi_vector(CLIPTokenizer.from_folder(root / "tokenizer")),
        scheduler_config=scheduler_config,
        params=params,
        dtype=dtype,
        source=root,
    )
    if vae is not None:
        if not weights:
            raise ValueError("weights=False cannot replace the VAE (vae=...): load it with the weights")
        pipe = pipe.with_vae(vae)
    release_free_memory()  # the conversion's freed buffers (see sdjax.memory)
    return pipe


__all__ = ["StableDiffusionPipeline", "load_pipeline"]

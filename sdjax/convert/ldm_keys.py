"""The declarative name map between original single-file checkpoints ("LDM" layout) and diffusers names.

A single-file Stable Diffusion checkpoint (CompVis / Stability, A1111, ComfyUI) stores the three models
under `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and either
`cond_stage_model.transformer.text_model.*` (SD 1.x: a transformers CLIP, diffusers names already) or
`cond_stage_model.model.*` (SD 2.x: OpenCLIP ViT-H, with q/k/v fused in `in_proj_*`).

The map is generated from the architecture config: each component has a list of `Rule`s that rename a
diffusers module prefix to its LDM prefix (plus renames inside the module), and is applied to the model's
own parameter names. Applying it yields one `LdmEntry` per LDM tensor, naming the diffusers tensor(s) it
holds and the tensor transform between the two layouts. The transforms themselves (`to_diffusers`,
`to_ldm`) are kept apart at the end of this file. Both directions use the same entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from sdjax.nn.controlnet import ControlNetConfig
from sdjax.nn.unet import UNetConfig
from sdjax.nn.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
CONTROLNET_PREFIX = "control_model."
# SDXL: `conditioner.embedders.0` is the OpenAI CLIP-L (transformers names; the refiner has none) and the
# next one the OpenCLIP bigG tower, whose `text_projection` is a (width, projection) matrix (x @ P).
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."


def sdxl_openclip_prefix(index: int) -> str:
    """The prefix of SDXL's OpenCLIP tower: embedder 1 in base models, 0 in the refiner."""
    return f"conditioner.embedders.{index}.model."


# Tensors real single files carry that are not model parameters (DDPM schedule buffers, EMA copies,
# CLIP position ids, the OpenCLIP contrastive head that SD does not use).
SKIP_KEYS = frozenset(
    """betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod
    log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance
    posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 logvar lvlb_weights
    cond_stage_model.transformer.text_model.embeddings.position_ids
    cond_stage_model.transformer.embeddings.position_ids
    cond_stage_model.model.logit_scale cond_stage_model.model.text_projection cond_stage_model.model.attn_mask
    conditioner.embedders.0.transformer.text_model.embeddings.position_ids
    conditioner.embedders.0.model.logit_scale conditioner.embedders.0.model.attn_mask
    conditioner.embedders.1.model.logit_scale conditioner.embedders.1.model.attn_mask
    """.split()
)
SKIP_PREFIXES = ("model_ema.",)
# Extra tensors of stand-alone VAE files (training loss / discriminator, EMA copies).
VAE_FILE_SKIP_PREFIXES = ("loss.", "model_ema.")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Renames the diffusers module `diffusers` (or one full key) to the LDM name `ldm`.

    `inner` renames the first sub-name(s) of what follows the module prefix (e.g. "norm1" -> "in_layers.0");
    sub-names it does not list are kept. `transforms` gives the layout transform of a remainder (e.g.
    "to_q.weight" -> "conv1x1"); the default is "copy".
    """

    diffusers: str
    ldm: str
    inner: Mapping[str, str] = dataclasses.field(default_factory=dict)
    transforms: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LdmEntry:
    """One tensor of the LDM file: its key, the diffusers key(s) it holds (q, k, v when fused), the transform."""

    ldm_key: str
    diffusers_keys: tuple[str, ...]
    transform: str  # "copy" | "conv1x1" (LDM [C, C, 1, 1] = diffusers [C, C]) | "qkv" (LDM = concat(q, k, v))
    # | "transpose" (OpenCLIP's text_projection)


# ---------------------------------------------------------------------------------------------- renames

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTENTION_TRANSFORMS = {f"{name}.weight": "conv1x1" for name in ("to_q", "to_k", "to_v", "to_out.0")}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    # q, k and v share one fused tensor each for weights and biases.
    "self_attn.q_proj.weight": "attn.in_proj_weight",
    "self_attn.k_proj.weight": "attn.in_proj_weight",
    "self_attn.v_proj.weight": "attn.in_proj_weight",
    "self_attn.q_proj.bias": "attn.in_proj_bias",
    "self_attn.k_proj.bias": "attn.in_proj_bias",
    "self_attn.v_proj.bias": "attn.in_proj_bias",
}
_OPENCLIP_LAYER_TRANSFORMS = {
    f"self_attn.{p}_proj.{leaf}": "qkv" for p in ("q", "k", "v") for leaf in ("weight", "bias")
}
_QKV_ORDER = ("q_proj", "k_proj", "v_proj")


# diffusers UNet modules the LDM layout has no name for (addition_embed_type "text"): a UNet with them has no
# single-file form, and name lookups in the LDM layout (kohya LoRA) leave them out. SDXL's add_embedding
# ("text_time") is `label_emb.0` there.
UNET_WITHOUT_LDM_NAME = ("add_embedding",)


def unet_rules(config: UNetConfig) -> list[Rule]:
    """UNet module renames. LDM numbers its blocks consecutively: `input_blocks.0` is conv_in, then per
    level `layers` resnets (`.0`, followed by the transformer `.1` where the level has attention) and a
    downsampler (`.0.op`); `middle_block.0/1/2`; `output_blocks` mirror the levels with one more resnet each
    and put the upsampler after the level's last resnet (`.1.conv`, or `.2.conv` after a transformer)."""
    rules = [
        Rule("time_embedding.linear_1", "time_embed.0"),
        Rule("time_embedding.linear_2", "time_embed.2"),
        Rule("conv_in", "input_blocks.0.0"),
        Rule("conv_norm_out", "out.0"),
        Rule("conv_out", "out.2"),
        Rule("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        Rule("mid_block.attentions.0", "middle_block.1"),
        Rule("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
    ]
    if config.addition_embed_type == "text_time":  # SDXL
        rules += [Rule("add_embedding.linear_1", "label_emb.0.0"), Rule("add_embedding.linear_2", "label_emb.0.2")]
    n, layers = config.num_blocks, config.layers()
    index = 1
    for level, block_type in enumerate(config.down_block_types):
        for j in range(layers[level]):
            rules.append(Rule(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET))
            if block_type == "CrossAttnDownBlock2D":
                rules.append(Rule(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1"))
            index += 1
        if level < n - 1:
            rules.append(Rule(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op"))
            index += 1
    index = 0
    for i, block_type in enumerate(config.up_block_types):
        attention = block_type == "CrossAttnUpBlock2D"
        count = layers[n - 1 - i] + 1
        for j in range(count):
            rules.append(Rule(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET))
            if attention:
                rules.append(Rule(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1"))
            if j == count - 1 and i < n - 1:
                slot = 2 if attention else 1
                rules.append(Rule(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv"))
            index += 1
    return rules


def controlnet_rules(config: ControlNetConfig) -> list[Rule]:
    """ControlNet module renames (lllyasviel's layout, under `control_model.` or bare): the UNet encoder's
    (`unet_rules`), the condition stack `input_hint_block.{0, 2, ..}` (convolutions at the even indices,
    SiLUs between), `zero_convs.{k}.0` for the down residuals and `middle_block_out.0` for the mid one."""
    encoder = ("time_embedding.", "conv_in", "mid_block.", "down_blocks.")
    rules = [r for r in unet_rules(config.unet_config()) if r.diffusers.startswith(encoder)]
    convs = ["conv_in"] + [f"blocks.{j}" for j in range(2 * (len(config.conditioning_embedding_out_channels) - 1))]
    convs.append("conv_out")
    rules += [Rule(f"controlnet_cond_embedding.{name}", f"input_hint_block.{2 * i}") for i, name in enumerate(convs)]
    rules += [Rule(f"controlnet_down_blocks.{k}", f"zero_convs.{k}.0") for k in range(config.residual_count)]
    rules.append(Rule("controlnet_mid_block", "middle_block_out.0"))
    return rules


def vae_rules(config: VAEConfig) -> list[Rule]:
    """VAE module renames: encoder `down.{i}.block.{j}`, decoder `up.{n-1-k}` = diffusers `up_blocks.{k}`,
    `mid.block_1/attn_1/block_2`, `norm_out`; the mid-attention projections are 1x1 convs in LDM."""
    n = len(config.block_out_channels)
    rules = [Rule("quant_conv", "quant_conv"), Rule("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [
            Rule(f"{part}.conv_in", f"{part}.conv_in"),
            Rule(f"{part}.conv_out", f"{part}.conv_out"),
            Rule(f"{part}.conv_norm_out", f"{part}.norm_out"),
            Rule(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
            Rule(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION, _VAE_ATTENTION_TRANSFORMS),
            Rule(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
        ]
    for i in range(n):
        for j in range(config.layers_per_block):
            rules.append(Rule(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        rules.append(Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
    for k in range(n):
        for j in range(config.layers_per_block + 1):
            rules.append(Rule(f"decoder.up_blocks.{k}.resnets.{j}", f"decoder.up.{n - 1 - k}.block.{j}", _VAE_RESNET))
        rules.append(Rule(f"decoder.up_blocks.{k}.upsamplers.0.conv", f"decoder.up.{n - 1 - k}.upsample.conv"))
    return rules


def openclip_rules(num_layers: int, projection: bool = False) -> list[Rule]:
    """OpenCLIP text-tower renames for the `num_layers` resblocks diffusers keeps, and with `projection`
    (SDXL's bigG) the pooled output's `text_projection`, stored transposed (x @ P)."""
    rules = [
        Rule("embeddings.token_embedding", "token_embedding"),
        Rule("embeddings.position_embedding.weight", "positional_embedding"),
        Rule("final_layer_norm", "ln_final"),
    ]
    if projection:
        rules.append(Rule("text_projection.weight", "text_projection", transforms={"": "transpose"}))
    for i in range(num_layers):
        rules.append(
            Rule(f"encoder.layers.{i}", f"transformer.resblocks.{i}", _OPENCLIP_LAYER, _OPENCLIP_LAYER_TRANSFORMS)
        )
    return rules


# ---------------------------------------------------------------------------------------------- applying


def _rename(key: str, rules_by_prefix: Mapping[str, Rule]) -> tuple[str, str]:
    """(LDM key, transform) of one diffusers key, by the rule of its longest matching module prefix."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        rule = rules_by_prefix.get(".".join(parts[:cut]))
        if rule is None:
            continue
        rest = ".".join(parts[cut:])
        if not rest:
            return rule.ldm, rule.transforms.get("", "copy")
        transform = rule.transforms.get(rest, "copy")
        for old, new in sorted(rule.inner.items(), key=lambda kv: -len(kv[0])):
            if rest == old or rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        return f"{rule.ldm}.{rest}", transform
    raise KeyError(f"no LDM name rule covers parameter {key}")


def build_entries(rules: Iterable[Rule] | None, diffusers_keys: Iterable[str], prefix: str) -> list[LdmEntry]:
    """Applies `rules` (None: identity) to every diffusers key of a component -> LDM entries with `prefix`.

    Keys renamed to the same LDM key must be a q/k/v triple with transform "qkv"; any other collision is a
    bug in the rules and raises.
    """
    by_prefix = {rule.diffusers: rule for rule in rules} if rules is not None else None
    grouped: dict[str, list[tuple[str, str]]] = {}
    for key in diffusers_keys:
        ldm, transform = (key, "copy") if by_prefix is None else _rename(key, by_prefix)
        grouped.setdefault(prefix + ldm, []).append((key, transform))
    entries = []
    for ldm_key, members in grouped.items():
        transforms = {t for _, t in members}
        if len(members) == 1 and transforms != {"qkv"}:
            entries.append(LdmEntry(ldm_key, (members[0][0],), members[0][1]))
        elif len(members) == 3 and transforms == {"qkv"}:
            order = sorted(members, key=lambda m: next(i for i, p in enumerate(_QKV_ORDER) if f".{p}." in m[0]))
            entries.append(LdmEntry(ldm_key, tuple(k for k, _ in order), "qkv"))
        else:
            raise ValueError(f"LDM key {ldm_key} would hold {[k for k, _ in members]}")
    return entries


# ---------------------------------------------------------------------------------------------- transforms

_TO_DIFFUSERS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "copy": lambda a, i: a,
    "conv1x1": lambda a, i: a.reshape(a.shape[:2]),  # [C, C, 1, 1] -> [C, C]
    "qkv": lambda a, i: np.split(a, 3, axis=0)[i],  # [3D, ...] -> the i-th [D, ...]
    "transpose": lambda a, i: a.T,  # OpenCLIP's x @ P -> torch Linear's (out, in) weight
}


def to_diffusers(entry: LdmEntry, array: np.ndarray, slot: int = 0) -> np.ndarray:
    """The diffusers tensor `entry.diffusers_keys[slot]` from the LDM tensor of `entry`."""
    return _TO_DIFFUSERS[entry.transform](array, slot)


def to_ldm(entry: LdmEntry, arrays: list[np.ndarray]) -> np.ndarray:
    """The LDM tensor of `entry` from its diffusers tensors (in `entry.diffusers_keys` order)."""
    if entry.transform == "qkv":
        return np.concatenate(arrays, axis=0)
    if entry.transform == "conv1x1":
        return arrays[0].reshape(arrays[0].shape + (1, 1))
    if entry.transform == "transpose":
        return np.ascontiguousarray(arrays[0].T)
    return arrays[0]


def diffusers_shape(entry: LdmEntry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of (each of) the diffusers tensor(s) of `entry`, given the LDM tensor's shape."""
    if entry.transform == "qkv":
        return (shape[0] // 3,) + tuple(shape[1:])
    if entry.transform == "conv1x1":
        return tuple(shape[:2])
    if entry.transform == "transpose":
        return tuple(shape[::-1])
    return tuple(shape)


def ldm_shape(entry: LdmEntry, diffusers_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The LDM tensor's shape given the shape of (each of) its diffusers tensor(s)."""
    if entry.transform == "qkv":
        return (3 * diffusers_shape[0],) + tuple(diffusers_shape[1:])
    if entry.transform == "conv1x1":
        return tuple(diffusers_shape) + (1, 1)
    if entry.transform == "transpose":
        return tuple(diffusers_shape[::-1])
    return tuple(diffusers_shape)

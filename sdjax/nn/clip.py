"""The CLIP text encoder (transformers' `CLIPTextModel`, and `CLIPTextModelWithProjection`: SDXL's second
encoder): token ids -> per-token embeddings for the UNet (and a projected pooled embedding)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.nn import kernels
from sdjax.nn.config_utils import config_from_dict, config_to_dict
from sdjax.nn.layers import Dense, layer_norm

WITH_PROJECTION = "CLIPTextModelWithProjection"

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# transformers settings that cannot change the text encoder's forward pass (training, generation, heads
# that SD does not use, bookkeeping).
CLIP_NO_EFFECT = frozenset(
    """architectures model_type torch_dtype dtype transformers_version initializer_range initializer_factor
    dropout attention_dropout bos_token_id pad_token_id sep_token_id decoder_start_token_id
    return_dict output_hidden_states output_attentions torchscript use_bfloat16 tf_legacy_loss pruned_heads
    tie_word_embeddings chunk_size_feed_forward is_encoder_decoder is_decoder cross_attention_hidden_size
    add_cross_attention tie_encoder_decoder max_length min_length do_sample early_stopping num_beams
    num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty
    no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens finetuning_task id2label
    label2id tokenizer_class prefix task_specific_params problem_type use_cache gradient_checkpointing
    """.split()
)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a `CLIPTextModel`; names and defaults are transformers' `CLIPTextConfig`.

    `projection_dim` is set only for a `CLIPTextModelWithProjection` (config.json's `architectures`): the
    pooled output then goes through `text_projection` (no bias) to `text_embeds`. Plain text-encoder
    configs carry a `projection_dim` too, which changes nothing and is dropped.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; sdjax supports {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")

    @classmethod
    def from_dict(cls, raw: dict, what: str = "text_encoder/config.json") -> CLIPTextConfig:
        raw = dict(raw) if isinstance(raw, dict) else raw
        if isinstance(raw, dict):
            if WITH_PROJECTION in (raw.get("architectures") or ()):
                raw.setdefault("projection_dim", 512)  # transformers' default
            else:
                raw.pop("projection_dim", None)
        return config_from_dict(cls, raw, what=what, unsupported_defaults={}, no_effect=CLIP_NO_EFFECT)

    def to_dict(self) -> dict[str, Any]:
        name = WITH_PROJECTION if self.projection_dim is not None else "CLIPTextModel"
        out = config_to_dict(self, {}, {"architectures": [name], "model_type": "clip_text_model"})
        if self.projection_dim is None:
            del out["projection_dim"]
        return out


class CLIPTextOutput(NamedTuple):
    """last_hidden_state (B, L, D) after the final LayerNorm; pooler_output (B, D) at each EOS token;
    hidden_states: the embeddings then every layer's output, num_hidden_layers + 1 arrays of (B, L, D)
    before the final LayerNorm (diffusers' clip_skip = k uses hidden_states[-(k + 1)]); text_embeds
    (B, projection_dim): `text_projection` of the pooled output, with a projection only (else None)."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]
    text_embeds: jax.Array | None = None


class _SelfAttention(nn.Module):
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD):
        b, length, dim = x_BLD.shape
        split = lambda t: t.reshape(b, length, self.heads, dim // self.heads)
        q, k, v = (split(Dense(dim, dtype=self.dtype, name=n)(x_BLD)) for n in ("q_proj", "k_proj", "v_proj"))
        out = kernels.attention(q, k, v, causal=True).reshape(b, length, dim)
        return Dense(dim, dtype=self.dtype, name="out_proj")(out)


class _EncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.config
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm1")(x_BLD)
        x_BLD = x_BLD + _SelfAttention(cfg.num_attention_heads, self.dtype, name="self_attn")(h)
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm2")(x_BLD)
        h = Dense(cfg.intermediate_size, dtype=self.dtype, name="mlp.fc1")(h)
        h = _ACTIVATIONS[cfg.hidden_act](h)
        return x_BLD + Dense(cfg.hidden_size, dtype=self.dtype, name="mlp.fc2")(h)


class CLIPTextModel(nn.Module):
    """ids (B, L) int, L <= max_position_embeddings -> `CLIPTextOutput` (causal self-attention); with
    `config.projection_dim`, transformers' `CLIPTextModelWithProjection` (its `text_projection` as a
    top-level parameter, beside the encoder's)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids_BL: jax.Array) -> CLIPTextOutput:
        cfg = self.config
        length = input_ids_BL.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"{length} tokens exceed the text encoder's {cfg.max_position_embeddings} positions")
        token = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="embeddings.token_embedding")
        position = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            dtype=self.dtype,
            name="embeddings.position_embedding",
        )
        h = token(input_ids_BL) + position(jnp.arange(length))[None]
        hidden_states = [h]
        for i in range(cfg.num_hidden_layers):
            h = _EncoderLayer(cfg, self.dtype, name=f"encoder.layers.{i}")(h)
            hidden_states.append(h)
        last = layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(h)
        if cfg.eos_token_id == 2:
            # Old configs (eos_token_id 2) pool at the largest id, which is EOS in the CLIP vocabulary.
            eos_pos_B = jnp.argmax(input_ids_BL, axis=-1)
        else:
            eos_pos_B = jnp.argmax(input_ids_BL == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos_B[:, None, None], axis=1)[:, 0]
        text_embeds = None
        if cfg.projection_dim is not None:
            text_embeds = Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
        return CLIPTextOutput(last, pooled, tuple(hidden_states), text_embeds)

    def dummy_inputs(self) -> tuple[jax.Array]:
        return (jnp.zeros((1, self.config.max_position_embeddings), jnp.int32),)

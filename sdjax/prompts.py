"""Prompt text -> weighted 77-token windows -> text-encoder context: A1111 emphasis and long prompts.

Stable Diffusion's text encoder reads 77 tokens. diffusers truncates longer prompts; AUTOMATIC1111's
web UI (A1111) instead splits them into windows, encodes each, and concatenates the embeddings along the
sequence axis (the UNet's cross-attention accepts any context length). It also reads emphasis syntax
that scales individual token embeddings. This module does both, in two steps:

1. host side, `tokenize_prompts` (or `tokenize_batch`): text -> ids (B, W*77) int32 and per-token weights
   (B, W*77) float32, W = number of 77-token windows (the same W for every row of a call);
2. device side, `encode_prompt_windows`: a pure, jittable function ids/weights -> context (B, W*77, D).
   W is static (it comes from the shapes), ids and weights are traced, so new prompts with the same
   window count reuse the compiled program.

Behaviour, with A1111 as the spec (`modules/prompt_parser.py`, `modules/sd_hijack_clip.py`,
`modules/sd_emphasis.py`):

- Emphasis (`parse_prompt_attention`): ``(text)`` x1.1, ``[text]`` /1.1, ``(text:1.3)`` x1.3, nesting
  multiplies, unclosed brackets apply to the end of the prompt, ``\\( \\) \\[ \\] \\\\`` are literal
  characters (a backslash before anything else is dropped), unmatched ``)`` / ``]`` and stray ``:`` are
  literal text. Weights are kept as A1111 computes them, float for float.
- ``BREAK`` (upper case, a whole word) ends the current window; the rest starts a new one. As in A1111, a
  BREAK inside an unclosed bracket gets that bracket's factor and is then no break: it is tokenized as
  the word "break" with that (negative) weight.
- Each emphasis fragment is tokenized on its own (as A1111 does); a prompt without emphasis syntax is a
  single fragment, tokenized exactly as transformers would.
- Windows hold 75 prompt tokens: ``[BOS] + tokens + [EOS]``, then the tokenizer's pad id up to 77, i.e.
  each window is what transformers' ``tokenizer(..., padding="max_length", max_length=77)`` gives for
  its tokens (SD 1.x pads with EOS 49407, SD 2.x with 0). This is also A1111's padding (EOS for SD 1.x;
  for SD 2.x it rewrites everything after the first EOS to 0). Specials and padding have weight 1.
  Consequently a prompt of at most 75 tokens without emphasis gives exactly diffusers' ids, and its
  context is exactly diffusers' embedding. Longer prompts are never truncated (diffusers would cut them
  at 75 tokens).
- Comma backtrack (A1111's ``comma_padding_backtrack``, default 20): when a window is full and the next
  token is not a comma, and the window's last ``,`` token lies within its last 20 tokens, the window ends
  right after that comma and the tokens after it move to the next window, so a phrase is not cut in two.
  ``comma_backtrack=0`` turns it off (hard cuts every 75 tokens).
- An empty prompt is one window (``[BOS, EOS, pad...]``). Rows that need fewer windows than the longest
  row of a call are padded with such empty-prompt windows, weight 1: A1111 pads the shorter of
  cond/uncond with the embedding of the empty prompt, which is what these windows encode to.
- Emphasis in the embedding (A1111's "Original" emphasis): ``z *= weight`` per token, then ``z`` is
  rescaled so its mean equals the mean before weighting. A1111 takes that mean per 77-token chunk over
  the whole batch it encodes at once, so a prompt's embedding depends on its batch mates; here the mean
  is per (sample, window), which equals A1111 at batch size 1 and keeps every image independent of the
  batch (each sample's overall mean is preserved too). A window whose weights are all 1 is returned
  untouched, bit for bit; a window whose weighted mean is 0 (all weights 0) is not rescaled, where A1111
  would produce NaNs. The arithmetic is float32 whatever the encoder dtype.
- ``clip_skip`` uses diffusers' numbering: k means ``hidden_states[-(k + 1)]`` through the final layer
  norm, so diffusers' ``clip_skip=1`` is A1111's "Clip skip: 2". diffusers applies clip_skip to the
  prompt only and encodes the negative prompt with the last layer; to match it, encode the two halves
  of `tokenize_prompts`' output with two calls.
- Prompt editing ``[from:to:when]`` and alternation ``[a|b]`` come before all of this: `prompt_schedule`
  (from `sdjax.prompt_editing`) splits a prompt into the texts of its steps, and each text is then
  tokenized as above.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.nn.clip import CLIPTextModel
from sdjax.nn.layers import layer_norm
from sdjax.prompt_editing import prompt_schedule
from sdjax.tokenizer import CLIPTokenizer

__all__ = [
    "LoraTag",
    "encode_prompt_windows",
    "encode_sdxl_prompt_windows",
    "parse_lora_tags",
    "prompt_pairs",
    "parse_prompt_attention",
    "tokenize_batch",
    "tokenize_prompt",
    "tokenize_prompts",
]

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
DEFAULT_COMMA_BACKTRACK = 20
BREAK = "BREAK"
_BREAK_WEIGHT = -1.0  # how a BREAK marker appears in `parse_prompt_attention` output (A1111's convention)

# One match per syntactic unit, tried in this order (A1111's grammar):
_ATTENTION_RE = re.compile(
    r"""
      \\[()\[\]\\]?                  # escape: \( \) \[ \] \\ -> the literal character; a lone \ -> nothing
    | \(                             # open round bracket
    | \[                             # open square bracket
    | :\s*([+-]?[.\d]+)\s*\)         # ':1.3)' closes a round bracket with an explicit weight
    | \)                             # close round bracket
    | \]                             # close square bracket
    | [^\\()\[\]:]+                  # plain text
    | :                              # a ':' that is not part of a weight
    """,
    re.VERBOSE,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


# ---------------------------------------------------------------------- parsing


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Splits a prompt into (fragment, weight) pairs with A1111's emphasis rules.

    Same output as A1111's ``prompt_parser.parse_prompt_attention`` (as tuples): adjacent fragments of
    equal weight are merged, an empty prompt gives ``[("", 1.0)]``, and each ``BREAK`` keyword becomes
    the marker ``("BREAK", -1.0)``. For example ``"an (important) word"`` ->
    ``[("an ", 1.0), ("important", 1.1), (" word", 1.0)]`` and ``"((a)) [b] (c:1.5)"`` ->
    ``[("a", 1.21), (" ", 1.0), ("b", 0.909...), (" ", 1.0), ("c", 1.5)]``. Raises `ValueError` for
    an explicit weight that is not a number (``"(a:1.2.3)"``).
    """
    parts: list[list] = []  # [fragment, weight], mutable while brackets close
    open_round: list[int] = []  # index in `parts` where each unclosed bracket starts
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _ATTENTION_RE.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(parts))
        elif token == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), _parse_weight(weight, text))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:  # text, or a bracket/weight with nothing to close: literal
            for i, piece in enumerate(_BREAK_RE.split(token)):
                if i:
                    parts.append([BREAK, _BREAK_WEIGHT])
                parts.append([piece, 1.0])

    # Unclosed brackets reach to the end: round ones first, then square, each in opening order.
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)

    merged: list[list] = []
    for piece, w in parts:
        if merged and merged[-1][1] == w:
            merged[-1][0] += piece
        else:
            merged.append([piece, w])
    return [(piece, w) for piece, w in merged] or [("", 1.0)]


def _parse_weight(weight: str, prompt: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise ValueError(f"emphasis weight {weight!r} is not a number in prompt {prompt!r}") from None


def _is_break(fragment: str, weight: float) -> bool:
    return fragment == BREAK and weight == _BREAK_WEIGHT


# ---------------------------------------------------------------------- tokenizing


def tokenize_prompt(
    tokenizer: CLIPTokenizer,
    prompt: str,
    *,
    emphasis: bool = True,
    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
) -> tuple[np.ndarray, np.ndarray]:
    """One prompt -> (ids (W, L) int32, weights (W, L) float32), L = ``tokenizer.model_max_length`` (77).

    Each row is a window ``[BOS] + up to L-2 prompt tokens + [EOS] + padding`` (see the module docstring).
    ``emphasis=False`` reads the prompt literally (brackets and BREAK are text, all weights 1), like
    A1111's emphasis "None"; long prompts are still split into windows. ``comma_backtrack`` is A1111's
    ``comma_padding_backtrack`` (0 disables it).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if comma_backtrack < 0:
        raise ValueError(f"comma_backtrack must be >= 0, got {comma_backtrack}")
    fragments = parse_prompt_attention(prompt) if emphasis else [(prompt, 1.0)]
    token_lists = tokenizer.encode_plain_batch([fragment for fragment, _ in fragments])
    size = tokenizer.model_max_length - 2  # prompt tokens per window
    comma = tokenizer.token_to_id(",</w>")

    windows: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1  # position of the last comma token in the current window

    def close_window() -> None:
        nonlocal tokens, weights, last_comma
        windows.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for (fragment, weight), ids in zip(fragments, token_lists, strict=True):
        if _is_break(fragment, weight):
            close_window()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif comma_backtrack and len(tokens) == size and last_comma != -1 and size - last_comma <= comma_backtrack:
                cut = last_comma + 1
                carried = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close_window()
                tokens, weights = carried
            if len(tokens) == size:
                close_window()
            tokens.append(token)
            weights.append(weight)
    if tokens or not windows:
        close_window()

    ids_WL = np.full((len(windows), size + 2), tokenizer.pad_token_id, np.int32)
    weights_WL = np.ones((len(windows), size + 2), np.float32)
    for i, (window_tokens, window_weights) in enumerate(windows):
        n = len(window_tokens)
        ids_WL[i, : n + 2] = [tokenizer.bos_token_id, *window_tokens, tokenizer.eos_token_id]
        weights_WL[i, 1 : n + 1] = window_weights
    return ids_WL, weights_WL


def tokenize_batch(
    tokenizer: CLIPTokenizer,
    prompts: str | Sequence[str],
    *,
    min_windows: int = 1,
    emphasis: bool = True,
    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids (B, W*L) int32, weights (B, W*L) float32) with a common window count W.

    W is the largest window count of the batch, at least ``min_windows`` (fix it to bucket shapes and
    avoid recompiling for longer prompts); shorter rows are padded with empty-prompt windows of weight 1.
    """
    prompts = _as_list(prompts, "prompts")
    if min_windows < 1:
        raise ValueError(f"min_windows must be >= 1, got {min_windows}")
    per_prompt = [tokenize_prompt(tokenizer, p, emphasis=emphasis, comma_backtrack=comma_backtrack) for p in prompts]
    num_windows = max(min_windows, *(ids.shape[0] for ids, _ in per_prompt))
    empty_ids = tokenizer("")[0]
    length = empty_ids.shape[0]
    ids_BN = np.tile(empty_ids, (len(prompts), num_windows))
    weights_BN = np.ones((len(prompts), num_windows * length), np.float32)
    for row, (ids_WL, weights_WL) in enumerate(per_prompt):
        ids_BN[row, : ids_WL.size] = ids_WL.reshape(-1)
        weights_BN[row, : weights_WL.size] = weights_WL.reshape(-1)
    return ids_BN, weights_BN


def tokenize_prompts(
    tokenizer: CLIPTokenizer,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    *,
    min_windows: int = 1,
    emphasis: bool = True,
    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
) -> tuple[np.ndarray, np.ndarray]:
    """Negative and positive prompts -> (ids (2B, W*L) int32, weights (2B, W*L) float32), one W for all.

    Rows ``[0, B)`` are the negative prompts, rows ``[B, 2B)`` the prompts: the order of diffusers'
    classifier-free-guidance batch ``cat([negative, positive])``. ``negative_prompts`` is broadcast as
    `prompt_pairs` says. Other arguments as `tokenize_batch`.
    """
    prompts, negative_prompts = prompt_pairs(prompts, negative_prompts)
    return tokenize_batch(
        tokenizer,
        [*negative_prompts, *prompts],
        min_windows=min_windows,
        emphasis=emphasis,
        comma_backtrack=comma_backtrack,
    )


def _as_list(prompts, name: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a string or a non-empty list of strings")
    if not prompts:
        raise ValueError(f"{name} is empty: pass at least one prompt")
    return list(prompts)


def prompt_pairs(
    prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """(prompts, negative prompts) as two lists of equal length: a negative prompt of None is the empty
    prompt for every row (as diffusers), a single string or a one-item list is used for every row, and
    otherwise there must be one per prompt."""
    prompts = _as_list(prompts, "prompt")
    if negative_prompts is None:
        return prompts, [""] * len(prompts)
    negatives = _as_list(negative_prompts, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    return prompts, negatives


# ---------------------------------------------------------------------------------------------- LoRA tags

_LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)((?::[^:>]*)*)>")


@dataclasses.dataclass(frozen=True)
class LoraTag:
    """An A1111 `<lora:name:te_weight:unet_weight>` prompt tag (one weight sets both; none means 1)."""

    name: str
    text_encoder: float = 1.0
    unet: float = 1.0

    @property
    def scale(self) -> dict[str, float]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Removes A1111 LoRA tags from a prompt -> (prompt without them, the tags in order).

    Accepted forms: `<lora:name>`, `<lora:name:0.8>` (both components), `<lora:name:0.5:1.0>` (text
    encoder, then UNet) and named `te=`/`unet=` weights, e.g. `<lora:name:unet=0.7>`; `<lyco:...>` alike.
    The files are found with `sdjax.convert.lora.find_lora`.
    """
    tags = []
    for match in _LORA_TAG.finditer(prompt):
        name = match.group(1).strip()
        fields = [f.strip() for f in match.group(2).split(":")[1:]]
        weights: dict[str, float] = {}
        positional = []
        for field in fields:
            key, eq, value = field.partition("=")
            try:
                if eq:
                    if key not in ("te", "unet"):
                        raise ValueError
                    weights[key] = float(value)
                else:
                    positional.append(float(field))
            except ValueError:
                raise ValueError(f"bad LoRA weight {field!r} in {match.group(0)}") from None
        te = weights.get("te", positional[0] if positional else 1.0)
        unet = weights.get("unet", positional[1] if len(positional) > 1 else te if positional else 1.0)
        tags.append(LoraTag(name, te, unet))
    cleaned = re.sub(r"[ \t]{2,}", " ", _LORA_TAG.sub("", prompt)).strip()
    return cleaned, tags


# ---------------------------------------------------------------------- encoding


def encode_prompt_windows(
    text_encoder: CLIPTextModel,
    text_params,
    ids_BN: jax.Array,
    weights_BN: jax.Array,
    clip_skip: int | None = None,
) -> jax.Array:
    """Context for the UNet: ids/weights (B, W*L) -> (B, W*L, D) in the encoder's dtype, L = 77.

    Each L-token window is encoded on its own (one batched call on (B*W, L)), taking the last hidden
    state, or for ``clip_skip=k`` hidden_states[-(k + 1)] through the final layer norm as diffusers'
    ``encode_prompt`` does; windows are concatenated and A1111's emphasis is applied per (sample, window)
    (see the module docstring). Pure and jittable: with ``text_encoder`` and ``clip_skip`` static, only
    the shape (B and W) selects the compiled program.
    """
    cfg = text_encoder.config
    out, windows = _encode_windows(text_encoder, text_params, ids_BN, weights_BN, clip_skip, cfg.num_hidden_layers)
    if not clip_skip:
        z = out.last_hidden_state
    else:
        final_norm = layer_norm(cfg.layer_norm_eps, text_encoder.dtype, "final_layer_norm")
        z = final_norm.apply({"params": text_params["final_layer_norm"]}, out.hidden_states[-(clip_skip + 1)])
    return _emphasized(z, weights_BN, windows)


def encode_sdxl_prompt_windows(
    text_encoder: CLIPTextModel,
    text_params,
    ids_BN: jax.Array,
    weights_BN: jax.Array,
    clip_skip: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """One SDXL text encoder's part of the context: ids/weights (B, W*L) -> ((B, W*L, D), the projected
    pooled embedding of the first window (B, P), or None for an encoder without projection).

    As diffusers' SDXL `encode_prompt`: hidden_states[-(clip_skip + 2)] (the penultimate layer by
    default), without the final layer norm; windows and emphasis as `encode_prompt_windows`.
    """
    layers = text_encoder.config.num_hidden_layers
    out, windows = _encode_windows(text_encoder, text_params, ids_BN, weights_BN, clip_skip, layers - 1)
    z = out.hidden_states[-((clip_skip or 0) + 2)]
    pooled = None
    if out.text_embeds is not None:
        pooled = out.text_embeds.reshape(ids_BN.shape[0], windows, -1)[:, 0]
    return _emphasized(z, weights_BN, windows), pooled


def _encode_windows(text_encoder, text_params, ids_BN, weights_BN, clip_skip, max_skip: int):
    """The text encoder's output on every L-token window of ids (B, W*L), one batched call on (B*W, L)
    -> (CLIPTextOutput, W), after checking the shapes and clip_skip in [0, max_skip]."""
    length = text_encoder.config.max_position_embeddings
    batch, n = ids_BN.shape
    if weights_BN.shape != ids_BN.shape:
        raise ValueError(f"weights shape {weights_BN.shape} != ids shape {ids_BN.shape}")
    if n == 0 or n % length:
        raise ValueError(f"ids length {n} is not a positive multiple of the {length}-token window")
    if clip_skip is not None and not 0 <= clip_skip <= max_skip:
        raise ValueError(f"clip_skip must be in [0, {max_skip}], got {clip_skip}")
    windows = n // length
    return text_encoder.apply({"params": text_params}, ids_BN.reshape(batch * windows, length)), windows


def _emphasized(z, weights_BN, windows: int) -> jax.Array:
    """Per-window states (B*W, L, D) -> (B, W*L, D) with A1111's emphasis of `weights_BN` applied."""
    batch, n = weights_BN.shape
    length = n // windows
    z_BWLD = z.reshape(batch, windows, length, z.shape[-1])
    z_BWLD = _emphasize(z_BWLD, jnp.asarray(weights_BN).reshape(batch, windows, length))
    return z_BWLD.reshape(batch, n, z.shape[-1])


def _emphasize(z_BWLD: jax.Array, weights_BWL: jax.Array) -> jax.Array:
    """A1111's emphasis per (sample, window): z * w, rescaled to the unweighted mean; exact no-op for w == 1."""
    z = z_BWLD.astype(jnp.float32)
    weighted = z * weights_BWL.astype(jnp.float32)[..., None]
    mean_before = z.mean(axis=(2, 3), keepdims=True)
    mean_after = weighted.mean(axis=(2, 3), keepdims=True)
    degenerate = mean_after == 0
    ratio = jnp.where(degenerate, 1.0, mean_before / jnp.where(degenerate, 1.0, mean_after))
    emphasized = (weighted * ratio).astype(z_BWLD.dtype)
    plain_BW = jnp.all(weights_BWL == 1, axis=-1)
    return jnp.where(plain_BW[..., None, None], z_BWLD, emphasized)


__all__ = [
    "LoraTag",
    "encode_prompt_windows",
    "encode_sdxl_prompt_windows",
    "parse_lora_tags",
    "parse_prompt_attention",
    "prompt_pairs",
    "prompt_schedule",
    "tokenize_batch",
    "tokenize_prompt",
    "tokenize_prompts",
]

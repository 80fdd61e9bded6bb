"""Textual-inversion embeddings: new trigger words for the tokenizer, new rows for the token embedding.

File formats (one embedding of n >= 1 vectors of the text encoder's width D):

| format                                   | tensors                         | trigger word by default |
|------------------------------------------|---------------------------------|-------------------------|
| A1111 `.pt` (torch.load(weights_only))   | `string_to_param["*"]` (n, D)   | the file name (stem)    |
| A1111 `.safetensors`                     | `emb_params` (n, D)             | the file name (stem)    |
| diffusers `learned_embeds.safetensors`   | `{token: (D,) or (n, D)}`       | its key                 |

As diffusers, an n-vector embedding adds the tokens `T`, `T_1`, ..., `T_{n-1}` after the vocabulary
(ids len(tokenizer), ...), and the text encoder's token embedding grows by those n rows. Unlike diffusers,
whose pipeline rewrites each prompt (`maybe_convert_prompt`), the returned tokenizer itself turns the
trigger word into its n ids, so every encoding path (prompts with weights, long prompts) sees them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.tensor_files import check_finite, check_float, is_torch_pickle, load_torch_pickle, read_checkpoint
from sdjax.nn.clip import CLIPTextModel
from sdjax.tokenizer import CLIPTokenizer


class EmbeddingError(ValueError):
    """An embedding file that cannot be used (unknown format, wrong width, taken trigger word); one line."""


@dataclasses.dataclass(frozen=True, eq=False)
class MultiVectorTokenizer(CLIPTokenizer):
    """A `CLIPTokenizer` that writes each multi-vector trigger word as its n tokens before encoding.

    `expansions` holds (trigger, "trigger trigger_1 ... trigger_{n-1}") pairs; a trigger is matched without
    regard to case (as the added tokens are) and not when it is followed by "_<digit>" (one of its own
    extra tokens typed out).
    """

    expansions: tuple[tuple[str, str], ...] = ()

    def expand(self, text: str) -> str:
        """`text` with every multi-vector trigger replaced by its token sequence."""
        for trigger, expansion in self.expansions:
            text = re.sub(re.escape(trigger) + r"(?!_\d)", lambda _, e=expansion: e, text, flags=re.IGNORECASE)
        return text

    def encode_plain(self, text: str) -> list[int]:
        return super().encode_plain(self.expand(text))

    def encode_plain_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return super().encode_plain_batch([self.expand(t) for t in texts])


# ---------------------------------------------------------------------------------------------- reading


def _vectors(value: Any, path: Path, key: str) -> np.ndarray:
    """The tensor `key` of an embedding file as float32 vectors (n, D); refused when it is not a float tensor
    or holds NaN/Inf."""
    array = np.asarray(value)
    check_float(array.dtype, str(path), key)
    array = array.astype(np.float32)
    check_finite(array, str(path), key)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise EmbeddingError(f"{path}: expected an embedding of shape (n, D) or (D,), got {array.shape}")
    return array


def _read_tensors(path: Path) -> Mapping[str, Any] | np.ndarray:
    """The tensors of an embedding file (safetensors or a weights-only PyTorch pickle), or a bare tensor."""
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} does not exist")
    if is_torch_pickle(path):
        obj = load_torch_pickle(path)
        if not isinstance(obj, dict | np.ndarray):
            raise EmbeddingError(f"{path}: a PyTorch file holding a {type(obj).__name__}, not an embedding")
        return obj
    return read_checkpoint(path)


def read_sdxl_embedding(path: str | Path, token: str | None = None) -> tuple[str, np.ndarray | None, np.ndarray]:
    """(trigger word, clip_l vectors (n, 768) or None, clip_g vectors (n, 1280)) of an SDXL embedding file
    (`clip_l` for the first text encoder, `clip_g` for the second; trigger word: the file's name unless
    `token`). Raises `EmbeddingError` for SD 1.x/2.x files and other layouts."""
    path = Path(path).expanduser()
    tensors = _read_tensors(path)
    if not isinstance(tensors, Mapping) or "clip_g" not in tensors:
        raise EmbeddingError(
            f"{path} is not an SDXL embedding (no clip_g/clip_l pair): an SD 1.x/2.x embedding does not fit SDXL"
        )
    clip_l = _vectors(tensors["clip_l"], path, "clip_l") if "clip_l" in tensors else None
    clip_g = _vectors(tensors["clip_g"], path, "clip_g")
    if clip_l is not None and clip_l.shape[0] != clip_g.shape[0]:
        raise EmbeddingError(f"{path}: clip_l has {clip_l.shape[0]} vectors but clip_g {clip_g.shape[0]}")
    return token or path.stem, clip_l, clip_g


def read_embedding(path: str | Path, token: str | None = None) -> tuple[str, np.ndarray]:
    """(trigger word, vectors (n, D) float32) of an A1111 or diffusers embedding file; `token` overrides
    the trigger word. Raises `EmbeddingError` for SDXL (clip_l/clip_g: `read_sdxl_embedding`) and unknown
    layouts."""
    path = Path(path).expanduser()
    tensors = _read_tensors(path)
    if isinstance(tensors, np.ndarray):  # a bare tensor (diffusers accepts one with an explicit token)
        if token is None:
            raise EmbeddingError(f"{path} holds a bare tensor without a trigger word: pass token=")
        return token, _vectors(tensors, path, "<bare tensor>")
    keys = list(tensors)
    if "clip_l" in keys or "clip_g" in keys:
        raise EmbeddingError(f"{path} is an SDXL embedding (clip_l/clip_g); it fits SDXL models only")
    if "string_to_param" in keys:
        params = tensors["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise EmbeddingError(f"{path}: string_to_param holds no tensor")
        name = "*" if "*" in params else next(iter(params))
        return token or path.stem, _vectors(params[name], path, f"string_to_param.{name}")
    if "emb_params" in keys:
        return token or path.stem, _vectors(tensors["emb_params"], path, "emb_params")
    arrays = [k for k in keys if isinstance(tensors[k], np.ndarray)]
    if len(keys) == 1 and arrays:
        return token or keys[0], _vectors(tensors[keys[0]], path, keys[0])
    shown = ", ".join(sorted(keys)[:4])
    raise EmbeddingError(f"{path} is not a textual-inversion embedding (keys: {shown})")


# ---------------------------------------------------------------------------------------------- adding


def add_embedding(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    params: Mapping,
    trigger: str,
    vectors: np.ndarray,
) -> tuple[MultiVectorTokenizer, CLIPTextModel, dict]:
    """Adds one embedding -> (tokenizer, text-encoder module, text-encoder params), all new.

    The n vectors (n, D) become tokens `trigger`, `trigger_1`, ... with ids V, V+1, ... where V is the
    embedding table's row count (= len(tokenizer)); the module's config `vocab_size` grows to V + n. A table
    given as a `jax.ShapeDtypeStruct` (a shapes-only pipeline) grows in shape only.
    """
    width = text_encoder.config.hidden_size
    if vectors.shape[1] != width:
        raise EmbeddingError(
            f"embedding {trigger!r} has vectors of width {vectors.shape[1]} but the text encoder's is {width} "
            "(made for another model: SD 1.x is 768 wide, SD 2.x 1024)"
        )
    n = vectors.shape[0]
    tokens = [trigger] + [f"{trigger}_{i}" for i in range(1, n)]
    taken = [t for t in tokens if tokenizer.token_to_id(t) is not None]
    if taken:
        raise EmbeddingError(f"token {taken[0]!r} is already in the tokenizer: choose another trigger word (token=)")
    table = params["embeddings.token_embedding"]["embedding"]
    rows = table.shape[0]
    if len(tokenizer) != rows:
        raise EmbeddingError(f"the tokenizer has {len(tokenizer)} tokens but the token embedding {rows} rows")
    new = tokenizer.add_tokens(tokens)
    ids = [new.token_to_id(t) for t in tokens]
    if ids != list(range(rows, rows + n)):
        raise EmbeddingError(f"the new tokens got ids {ids}, not {rows}..{rows + n - 1}")
    expansions = getattr(tokenizer, "expansions", ())
    if n > 1:
        expansions = expansions + ((trigger, " ".join(tokens)),)
    fields = {f.name: getattr(new, f.name) for f in dataclasses.fields(CLIPTokenizer)}
    new = MultiVectorTokenizer(**fields, expansions=expansions)
    config = dataclasses.replace(text_encoder.config, vocab_size=rows + n)
    module = CLIPTextModel(config, dtype=text_encoder.dtype)
    if isinstance(table, jax.ShapeDtypeStruct):  # a shapes-only pipeline (`load_pipeline(weights=False)`)
        grown = jax.ShapeDtypeStruct((rows + n, width), table.dtype)
    else:
        grown = jnp.concatenate([table, jnp.asarray(vectors, table.dtype)], axis=0)
    new_params = dict(params)
    new_params["embeddings.token_embedding"] = {**params["embeddings.token_embedding"], "embedding": grown}
    return new, module, new_params


def restore_multi_vector(tokenizer: CLIPTokenizer) -> CLIPTokenizer:
    """A tokenizer read back from a saved folder (`T`, `T_1`, ... as plain added tokens) with its
    multi-vector triggers expanding again; unchanged when there are none."""
    added = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if not t.special}
    expansions = []
    for token in sorted(added):
        if f"{token}_1" in added and not re.search(r"_\d+$", token):
            count = 1
            while f"{token}_{count}" in added:
                count += 1
            expansions.append((token, " ".join([token] + [f"{token}_{i}" for i in range(1, count)])))
    if not expansions:
        return tokenizer
    fields = {f.name: getattr(tokenizer, f.name) for f in dataclasses.fields(CLIPTokenizer)}
    return MultiVectorTokenizer(**fields, expansions=tuple(expansions))


__all__ = [
    "EmbeddingError",
    "MultiVectorTokenizer",
    "add_embedding",
    "read_embedding",
    "read_sdxl_embedding",
    "restore_multi_vector",
]

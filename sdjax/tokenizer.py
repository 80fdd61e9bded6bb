"""CLIP byte-level BPE tokenizer for Stable Diffusion, built on the `tokenizers` library.

Reads a diffusers ``tokenizer/`` folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and,
if present, ``special_tokens_map.json``) and produces exactly the ids of transformers'
``CLIPTokenizer.from_pretrained(folder)(prompts, padding="max_length", max_length=77,
truncation=True).input_ids``, without importing transformers or torch.

The pipeline (the same one transformers builds for CLIP):

1. normalize: Unicode NFC, every run of whitespace -> one space, lower case;
2. pre-tokenize: split into CLIP words (``'s|'t|'re|'ve|'m|'ll|'d``, runs of letters, single digits,
   runs of other non-space characters; the whitespace itself is dropped), then byte-level mapping
   (with the GPT-2 split applied again inside each word);
3. BPE over each word, whose last symbol carries the ``</w>`` end-of-word suffix;
4. ``__call__`` adds ``<|startoftext|>`` ... ``<|endoftext|>``, truncates and pads.

Special tokens (bos, eos, unk, pad) are registered as "added tokens": their literal text in a prompt
is matched before BPE and maps to a single id. Which settings win follows transformers:
``special_tokens_map.json`` overrides ``tokenizer_config.json`` (unless the config carries an
``added_tokens_decoder``, in which case the map file is ignored). For SD 2.x this makes the pad token
``"!"`` (id 0), not the config's ``"<|endoftext|>"``, so prompts pad with 0 and every ``"!"`` in a
prompt is a lone id 0 (``"!!"`` is ``[0, 0]``, never the BPE token ``"!!"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sdjax import files

__all__ = ["CLIPTokenizer"]

_VOCAB_FILE = "vocab.json"
_MERGES_FILE = "merges.txt"
_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_MAP_FILE = "special_tokens_map.json"

# CLIP's word pattern (OpenAI `simple_tokenizer.py`), as a match list: the text between matches is dropped.
_CLIP_WORD_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_END_OF_WORD = "</w>"

# Named special tokens in the order transformers registers them (the last registration of a given text
# decides its flags), and CLIP's defaults for the ones a folder may leave out.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLIP_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_CLIP_CONTEXT_LENGTH = 77


@dataclasses.dataclass(frozen=True, eq=False)
class CLIPTokenizer:
    """A CLIP BPE tokenizer; immutable (``add_tokens`` returns a new one).

    Attributes:
      backend: the `tokenizers.Tokenizer` doing normalization, pre-tokenization and BPE (no post-processor,
        truncation or padding configured; treat it as read-only).
      model_max_length: sequence length the text encoder takes, 77 for every SD model.
      bos_token, eos_token, pad_token, unk_token: the special token texts.
      bos_token_id, eos_token_id, pad_token_id: their ids (SD 1.x: 49406, 49407, 49407; SD 2.x and the
        second SDXL tokenizer: 49406, 49407, 0).
    """

    backend: Tokenizer = dataclasses.field(repr=False)
    model_max_length: int
    bos_token: str
    eos_token: str
    pad_token: str
    unk_token: str
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Loads a diffusers/transformers CLIP ``tokenizer/`` folder.

        ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` are required; ``special_tokens_map.json``
        is optional (newer exports fold it into the config). Raises `FileNotFoundError` naming the
        missing file or folder, `ValueError` naming the file that cannot be parsed.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        for name in (_VOCAB_FILE, _MERGES_FILE, _CONFIG_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"tokenizer folder {folder} is missing {name}")

        config = _read_json(folder / _CONFIG_FILE)
        special_map = _read_json(folder / _SPECIAL_MAP_FILE) if (folder / _SPECIAL_MAP_FILE).is_file() else {}
        try:
            vocab, merges = BPE.read_file(str(folder / _VOCAB_FILE), str(folder / _MERGES_FILE))
        except Exception as e:
            raise ValueError(f"cannot read {folder / _VOCAB_FILE} / {_MERGES_FILE}: {e}") from e

        specials = _special_tokens(config, special_map, folder / _CONFIG_FILE)
        backend = _build_backend(vocab, merges, unk_token=specials["unk_token"].content)

        # Tokens already saved with ids (e.g. a textual-inversion export) keep exactly those ids.
        for token_id, token in _saved_added_tokens(config, folder / _CONFIG_FILE):
            backend.add_tokens([token])
            if backend.token_to_id(token.content) != token_id:
                raise ValueError(
                    f"{folder / _CONFIG_FILE}: added token {token.content!r} should have id {token_id}, "
                    f"got {backend.token_to_id(token.content)}"
                )
        # One registration per named special token, in transformers' order: the last one for a given
        # text sets its flags (SD 1.x: the plain-string pad "<|endoftext|>" makes eos normalized=False).
        backend.add_special_tokens(list(specials.values()))

        max_length = config.get("model_max_length", _CLIP_CONTEXT_LENGTH)
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"{folder / _CONFIG_FILE}: model_max_length must be an int >= 2, got {max_length!r}")
        texts = {key: token.content for key, token in specials.items()}
        return cls(
            backend=backend,
            model_max_length=max_length,
            bos_token=texts["bos_token"],
            eos_token=texts["eos_token"],
            pad_token=texts["pad_token"],
            unk_token=texts["unk_token"],
            bos_token_id=backend.token_to_id(texts["bos_token"]),
            eos_token_id=backend.token_to_id(texts["eos_token"]),
            pad_token_id=backend.token_to_id(texts["pad_token"]),
        )

    # ------------------------------------------------------------------ sizes and lookups

    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary without added tokens (49408 for CLIP), like transformers."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Vocabulary size including added tokens: the row count the token embedding needs."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry or added token (``"cat</w>"``, ``"<my-token>"``), None if unknown."""
        return self.backend.token_to_id(token)

    # ------------------------------------------------------------------ encoding

    def __call__(
        self,
        prompts: str | Sequence[str],
        padding: str | bool = "max_length",
        max_length: int | None = None,
        truncation: bool = True,
    ) -> np.ndarray:
        """Token ids of a prompt or batch of prompts: int32 array (B, L), B = 1 for a single string.

        Each row is ``[bos] + encode_plain(prompt) + [eos]`` then padded with ``pad_token_id``.
        ``max_length`` defaults to `model_max_length`. With ``truncation`` the plain ids are cut to
        ``max_length - 2`` so every row keeps its eos. ``padding="max_length"`` gives L = max_length;
        ``padding="longest"`` (or True) pads to the longest row of the batch. Equal to transformers'
        ``tokenizer(prompts, padding=..., max_length=..., truncation=...).input_ids``; raises
        `ValueError` where that would be ragged (a row longer than max_length without truncation).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a str or a sequence of str")
        if len(prompts) == 0:
            raise ValueError("prompts is an empty batch")
        if padding is True:
            padding = "longest"
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        max_length = self.model_max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for bos and eos), got {max_length}")

        plain = self.encode_plain_batch(prompts)
        if truncation:
            plain = [ids[: max_length - 2] for ids in plain]
        rows = [[self.bos_token_id, *ids, self.eos_token_id] for ids in plain]
        longest = max(len(r) for r in rows)
        if padding == "max_length" and longest > max_length:
            raise ValueError(
                f"a prompt has {longest} tokens > max_length={max_length} and truncation=False; "
                "use encode_plain to split long prompts"
            )
        width = max_length if padding == "max_length" else longest
        out = np.full((len(rows), width), self.pad_token_id, dtype=np.int32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos, untruncated (for splitting long prompts into 75-token windows)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_plain_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode_plain` for each text (encoded in parallel by the tokenizers backend)."""
        return [enc.ids for enc in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D id sequence: byte-level decode, ``</w>`` -> space, outer spaces stripped.

        Same string as transformers' ``tokenizer.decode(ids, skip_special_tokens=...)``. Lower-cased and
        whitespace-normalized, so not always the original prompt.
        """
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace(_END_OF_WORD, " ").strip()

    # ------------------------------------------------------------------ textual inversion

    def save(self, path: str | Path) -> Path:
        """Writes a tokenizer folder that `from_folder` and transformers' `CLIPTokenizer` both read back to
        the same ids: vocab.json, merges.txt, and a tokenizer_config.json whose ``added_tokens_decoder``
        records every added token (special tokens and e.g. textual-inversion tokens) with its id."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=f".vocab{files.TEMP_MARK}") as staging:
            for name in self.backend.model.save(staging):  # vocab.json, merges.txt: each replaced whole
                os.replace(name, folder / Path(name).name)
        added = {
            str(token_id): {
                "content": token.content,
                "lstrip": token.lstrip,
                "normalized": token.normalized,
                "rstrip": token.rstrip,
                "single_word": token.single_word,
                "special": token.special,
            }
            for token_id, token in sorted(self.backend.get_added_tokens_decoder().items())
        }
        named = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.model_max_length,
            "do_lower_case": True,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            **named,
            "added_tokens_decoder": added,
        }
        files.write_text(folder / _CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        files.write_text(folder / _SPECIAL_MAP_FILE, json.dumps(named, indent=2, ensure_ascii=False) + "\n")
        return folder

    def add_tokens(self, tokens: Sequence[str]) -> CLIPTokenizer:
        """A new tokenizer in which each string of ``tokens`` is one added token (self is unchanged).

        Equivalent to transformers' ``tokenizer.add_tokens(tokens)`` (non-special tokens, matched on
        normalized, i.e. lower-cased, text anywhere in a prompt, even inside a word). A new string
        gets the next free id, in order, after the vocabulary: for CLIP the first one is 49408, and the
        embedding table needs ``len(new_tokenizer)`` rows. A string that is already an added token
        keeps its id; one that already is a vocabulary entry keeps its vocabulary id but is now
        matched whole (adding ``"cat"`` splits ``"catalog"`` into ``"cat"`` + ``"alog"``). Look the
        ids up with `token_to_id`.
        """
        if isinstance(tokens, str):
            raise TypeError("tokens must be a list of str, not a str")
        if not all(isinstance(t, str) and t for t in tokens):
            raise ValueError("tokens must be non-empty strings")
        backend = Tokenizer.from_str(self.backend.to_str())
        backend.add_tokens([AddedToken(t, normalized=True, special=False) for t in tokens])
        return dataclasses.replace(self, backend=backend)


# ---------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _to_added_token(value: Any, normalized_default: bool, where: Path) -> AddedToken:
    """A special AddedToken from a config value: a plain string (normalized=False) or a token dict."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return AddedToken(
            value["content"],
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", normalized_default)),
            special=True,
        )
    raise ValueError(f"{where}: special token must be a string or a dict with 'content', got {value!r}")


def _saved_added_tokens(config: dict[str, Any], where: Path) -> list[tuple[int, AddedToken]]:
    """(id, token) pairs of a config's ``added_tokens_decoder``, sorted by id; [] if it has none."""
    saved = config.get("added_tokens_decoder") or {}
    out = []
    for key, value in saved.items():
        if not isinstance(value, dict) or not isinstance(value.get("content"), str):
            raise ValueError(f"{where}: bad added_tokens_decoder entry {key!r}: {value!r}")
        special = bool(value.get("special", False))
        token = AddedToken(
            value["content"],
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", not special)),
            special=special,
        )
        out.append((int(key), token))
    return sorted(out, key=lambda pair: pair[0])


def _special_tokens(config: dict[str, Any], special_map: dict[str, Any], where: Path) -> dict[str, AddedToken]:
    """Named special tokens, merged the way transformers merges the two files.

    Without ``added_tokens_decoder`` in the config: ``special_tokens_map.json`` entries override the
    config's (legacy folders, e.g. all SD 1.x/2.x). With it: the map file is ignored and a named token
    takes the flags of its ``added_tokens_decoder`` entry. Missing bos/eos/unk/pad get CLIP's defaults.
    Plain-string values are registered with normalized=False.
    """
    saved = {token.content: token for _, token in _saved_added_tokens(config, where)}
    use_map = "added_tokens_decoder" not in config
    merged: dict[str, tuple[Any, bool]] = {}
    for key in _SPECIAL_KEYS:
        if config.get(key) is not None:
            merged[key] = (config[key], True)  # config dicts carry no "special": normalized defaults to True
        if use_map and special_map.get(key) is not None:
            merged[key] = (special_map[key], False)
        if key not in merged and key in _CLIP_DEFAULTS:
            merged[key] = (_CLIP_DEFAULTS[key], False)
    out = {}
    for key, (value, normalized_default) in merged.items():
        token = _to_added_token(value, normalized_default, where)
        if token.content in saved:  # the saved entry's flags win, as a special token
            s = saved[token.content]
            token = AddedToken(
                s.content,
                single_word=s.single_word,
                lstrip=s.lstrip,
                rstrip=s.rstrip,
                normalized=s.normalized,
                special=True,
            )
        out[key] = token
    return out


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str) -> Tokenizer:
    """NFC/space/lower-case normalizer, CLIP words + byte level, BPE with ``</w>``, byte-level decoder."""
    backend = Tokenizer(
        BPE(
            vocab,
            merges,
            unk_token=unk_token,
            continuing_subword_prefix="",
            end_of_word_suffix=_END_OF_WORD,
            fuse_unk=False,
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # invert=True: the regex matches are the words; what lies between them (spaces) is removed.
            pre_tokenizers.Split(Regex(_CLIP_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend

"""Textual inversion: A1111 (.pt string_to_param, .safetensors emb_params) and diffusers learned_embeds files.

Parity with diffusers' `load_textual_inversion` on a tiny SD 1.x text encoder: the same token ids (ours
from the raw prompt; transformers' after diffusers' `maybe_convert_prompt`) and the same prompt
embeddings (`encode_prompt`), fp32, rel. L2 <= 1e-5.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference import (
    SD15,
    SMALL_CLIP,
    SMALL_UNET,
    SMALL_VAE,
    build_text_encoder,
    build_unet,
    build_vae,
    rel_l2,
    save_folder,
)

import sdjax
from sdjax.convert import textual_inversion as ti
from sdjax.convert.tensor_files import save_safetensors
from sdjax.prompts import tokenize_prompt

TOL = 1e-5
WIDTH = 32
PROMPTS = [
    "a photo of <cat-toy> on a beach, in the style of ink-style",
    "pixel-art <cat-toy>, (ink-style:1.2), <cat-toy>_1 is not a trigger",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Torch models, the sdjax pipeline from them, and three embedding files (1, 3 and 2 vectors)."""
    root = tmp_path_factory.mktemp("ti")
    models = {"unet": build_unet(SMALL_UNET, seed=3), "vae": build_vae(SMALL_VAE, seed=4)}
    models["text_encoder"] = build_text_encoder(SMALL_CLIP, seed=5)
    pipe = sdjax.load_pipeline(save_folder(root / "model", **models))
    rng = np.random.default_rng(0)
    files = {}
    # diffusers: one vector, stored 1-D, the key is the token.
    files["diffusers"] = root / "learned_embeds.safetensors"
    save_safetensors(files["diffusers"], {"<cat-toy>": rng.standard_normal(WIDTH, dtype=np.float32)})
    # A1111 .pt: three vectors under string_to_param["*"], with A1111's other entries.
    files["a1111_pt"] = root / "ink-style.pt"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(1))},
            "name": "ink-style",
            "step": 3000,
            "sd_checkpoint": "e1441589",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        files["a1111_pt"],
    )
    # A1111 .safetensors: two vectors under emb_params, in fp16.
    files["a1111_safetensors"] = root / "Pixel-Art.safetensors"
    save_safetensors(files["a1111_safetensors"], {"emb_params": rng.standard_normal((2, WIDTH)).astype(np.float16)})
    return dict(models=models, pipe=pipe, files=files)


def _with_all(pipe, files, tokens=None):
    """The pipeline with the three embeddings, trigger words from the file names / key unless given."""
    for name in ("diffusers", "a1111_pt", "a1111_safetensors"):
        pipe = pipe.load_textual_inversion(files[name], (tokens or {}).get(name))
    return pipe


def test_trigger_words_and_ids(setup):
    pipe, files = setup["pipe"], setup["files"]
    assert ti.read_embedding(files["diffusers"])[0] == "<cat-toy>"
    assert ti.read_embedding(files["a1111_pt"])[0] == "ink-style"  # A1111: the file name is the trigger
    assert ti.read_embedding(files["a1111_safetensors"], token="<px>")[0] == "<px>"
    loaded = _with_all(pipe, files)
    assert len(pipe.tokenizer) == 49408 and pipe.text_encoder.config.vocab_size == 49408  # unchanged
    assert len(loaded.tokenizer) == 49408 + 6 and loaded.text_encoder.config.vocab_size == 49408 + 6
    assert loaded.params["text_encoder"]["embeddings.token_embedding"]["embedding"].shape == (49414, WIDTH)
    tok = loaded.tokenizer
    assert tok.encode_plain("<cat-toy>") == [49408]
    assert tok.encode_plain("ink-style") == [49409, 49410, 49411]  # one trigger word, its 3 new ids
    assert tok.encode_plain("a PIXEL-ART b") == [tok.token_to_id("a</w>"), 49412, 49413, tok.token_to_id("b</w>")]
    # Emphasis applies to every vector of the trigger word.
    ids, weights = tokenize_prompt(tok, "a (ink-style:1.3) cat")
    assert list(ids[0, 2:5]) == [49409, 49410, 49411] and np.allclose(weights[0, 2:5], 1.3)
    np.testing.assert_array_equal(
        loaded.params["text_encoder"]["embeddings.token_embedding"]["embedding"][49412:],
        np.asarray(ti.read_embedding(files["a1111_safetensors"])[1]),
    )


def test_matches_diffusers_load_textual_inversion(setup):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    models = {k: copy.deepcopy(v) for k, v in setup["models"].items()}
    theirs = StableDiffusionPipeline(
        **models,
        tokenizer=CLIPTokenizer.from_pretrained(SD15 / "tokenizer"),
        scheduler=PNDMScheduler.from_pretrained(SD15 / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    files = setup["files"]
    # diffusers names A1111 embeddings by their stored "name" / key: give it the same trigger words. (Its
    # maybe_convert_prompt misses triggers with capitals, which the tokenizer lower-cases: use lower case.)
    theirs.load_textual_inversion(str(files["diffusers"]))
    theirs.load_textual_inversion(str(files["a1111_pt"]), token="ink-style")
    theirs.load_textual_inversion(str(files["a1111_safetensors"]), token="pixel-art")
    ours = _with_all(setup["pipe"], files, {"a1111_safetensors": "pixel-art"})

    converted = theirs.maybe_convert_prompt(PROMPTS, theirs.tokenizer)
    ref_ids = theirs.tokenizer(converted, padding="max_length", max_length=77, truncation=True).input_ids
    ids = ours.tokenizer(PROMPTS)
    np.testing.assert_array_equal(ids, np.array(ref_ids))
    assert (ids >= 49408).sum() == 1 + 3 + 2 + 1 + 3 + 1  # every trigger word became its new ids

    with torch.no_grad():
        ref, _ = theirs.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    out = ours.text_encoder.apply({"params": ours.params["text_encoder"]}, ids).last_hidden_state
    err = rel_l2(out, ref.numpy())
    print("textual inversion prompt embeddings rel. L2", err)
    assert err <= TOL
    base = setup["pipe"].text_encoder.apply({"params": setup["pipe"].params["text_encoder"]}, ids.clip(0, 49407))
    assert rel_l2(out, base.last_hidden_state) > 1e-2  # the new vectors matter


def test_restore_after_save(setup, tmp_path):
    """Saved and reloaded, the tokens survive (as with transformers); restore_multi_vector re-expands them."""
    loaded = _with_all(setup["pipe"], setup["files"])
    folder = loaded.tokenizer.save(tmp_path / "tokenizer")
    plain = sdjax.tokenizer.CLIPTokenizer.from_folder(folder)
    assert plain.encode_plain("ink-style") == [49409]
    restored = ti.restore_multi_vector(plain)
    assert restored.encode_plain("a ink-style b <cat-toy>") == loaded.tokenizer.encode_plain("a ink-style b <cat-toy>")


# ---------------------------------------------------------------------------------------------- bad files


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_bad_embeddings(setup, tmp_path):
    pipe = setup["pipe"]
    cases = {
        "wide": ({"emb_params": np.zeros((2, 48), np.float32)}, "width 48"),
        "sdxl": ({"clip_l": np.zeros((2, 768), np.float32), "clip_g": np.zeros((2, 1280), np.float32)}, "SDXL"),
        "other": ({"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float32)}, "not a textual-inversion"),
        "taken": ({"cat</w>": np.zeros(WIDTH, np.float32)}, "already in the tokenizer"),
    }
    for name, (tensors, words) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_safetensors(path, tensors)
        with pytest.raises(ti.EmbeddingError) as err:
            pipe.load_textual_inversion(path)
        assert words in _one_line(err), name
    with pytest.raises(ti.EmbeddingError) as err:
        pipe.load_textual_inversion(setup["files"]["diffusers"]).load_textual_inversion(setup["files"]["diffusers"])
    assert "already in the tokenizer" in _one_line(err)
    data = setup["files"]["a1111_safetensors"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-20])
    with pytest.raises(ValueError) as err:
        pipe.load_textual_inversion(cut)
    assert "truncated" in _one_line(err)

"""sdjax.prompts: A1111 emphasis parsing, 77-token windows, and the windowed text encoding.

Ids are checked against transformers' CLIPTokenizer and embeddings against a tiny random transformers
CLIPTextModel saved as a diffusers folder and loaded with `sdjax.load_pipeline` (fp32, rel. L2 <= 1e-5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from reference import SD15, SD21, build_text_encoder, build_unet, build_vae, rel_l2, save_folder

import sdjax
from sdjax.prompts import (
    encode_prompt_windows,
    parse_prompt_attention,
    tokenize_batch,
    tokenize_prompt,
    tokenize_prompts,
)
from sdjax.tokenizer import CLIPTokenizer

TOL = 1e-5
L = 77
BOS, EOS, COMMA = 49406, 49407, 267

PLAIN = [
    "",
    "a photo of an astronaut riding a horse on mars",
    "wow! great!! it's a dog's life, 1080p, café",
    " ".join(["cat"] * 75),  # exactly 75 tokens: still one window
]
LONG = (
    "a highly detailed matte painting of a gigantic ancient castle on a cliff above a stormy sea, "
    "dramatic lighting, volumetric fog, crows circling the towers, by greg rutkowski and alphonse mucha, "
    "trending on artstation, 8k resolution, octane render, unreal engine 5, cinematic composition, "
    "golden hour, intricate stonework, moss, ivy, waterfalls, tiny figures on the bridge for scale"
)

TINY_CLIP = {
    "sd1": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, eos_token_id=2),
    "sd2": dict(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act="gelu",
        eos_token_id=49407,
        layer_norm_eps=1e-6,
    ),
}


# ---------------------------------------------------------------------- parsing (A1111's documented examples)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("( word : 0.25 )", [(" word ", 0.25)]),
        ("[(a:1.5) b]", [("a", 1.5 / 1.1), (" b", 1 / 1.1)]),
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("a) b] c: d", [("a) b] c: d", 1.0)]),  # closers with nothing open and stray ':' are text
        ("x:1.5) y", [("x:1.5) y", 1.0)]),  # a weight without an open bracket is text
        (r"\\ \[x\] \) a\b", [("\\ [x] ) ab", 1.0)]),  # escapes; a lone backslash is dropped
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAK b", [("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("aBREAK break BREAKb", [("aBREAK break BREAKb", 1.0)]),  # only the whole upper-case word
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111: inside brackets it is no break
    ],
)
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == expected


def test_parse_rejects_a_bad_weight():
    with pytest.raises(ValueError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


# ---------------------------------------------------------------------- tokenizing


@pytest.fixture(scope="module")
def tokenizers():
    """name -> (ours, transformers') for the SD 1.5 (pad = EOS) and SD 2.1 (pad = 0) tokenizer folders."""
    return {
        name: (
            CLIPTokenizer.from_folder(root / "tokenizer"),
            transformers.CLIPTokenizer.from_pretrained(root / "tokenizer"),
        )
        for name, root in (("sd15", SD15), ("sd21", SD21))
    }


def hf_ids(ref, prompts):
    return np.asarray(ref(prompts, padding="max_length", max_length=L, truncation=True).input_ids, np.int32)


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_plain_prompt_gives_transformers_ids(tokenizers, name):
    ours, ref = tokenizers[name]
    ids, weights = tokenize_batch(ours, PLAIN)
    assert ids.shape == weights.shape == (len(PLAIN), L)
    assert ids.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_array_equal(ids, hf_ids(ref, PLAIN))
    assert np.all(weights == 1)
    # With emphasis off, brackets are literal text and the ids are still transformers'.
    literal = "a (red:1.5) [cat] BREAK"
    np.testing.assert_array_equal(tokenize_prompt(ours, literal, emphasis=False)[0], hf_ids(ref, [literal]))


def test_emphasis_weights_land_on_their_tokens(tokenizers):
    tok = tokenizers["sd15"][0]
    ids, weights = tokenize_prompt(tok, "a (red:1.5) [cat], ((sky))")
    plain = tok.encode_plain("a red cat, sky")
    np.testing.assert_array_equal(ids[0, : len(plain) + 2], [BOS, *plain, EOS])
    np.testing.assert_allclose(weights[0, : len(plain) + 2], [1, 1, 1.5, 1 / 1.1, 1, 1.21, 1], rtol=1e-6)
    assert np.all(weights[0, len(plain) + 2 :] == 1)


def expected_window(tok, tokens):
    row = np.full(L, tok.pad_token_id, np.int32)
    row[: len(tokens) + 2] = [BOS, *tokens, EOS]
    return row


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_long_prompt_windows(tokenizers, name):
    tok = tokenizers[name][0]
    text = LONG + ", " + LONG
    plain = tok.encode_plain(text)
    assert 150 < len(plain) <= 225
    ids, weights = tokenize_prompt(tok, text, comma_backtrack=0)
    expected = [expected_window(tok, plain[i : i + 75]) for i in range(0, len(plain), 75)]
    np.testing.assert_array_equal(ids, np.stack(expected))
    assert np.all(weights == 1)

    # Default comma backtrack: each window ends at its last comma when that is within its last 20 tokens.
    ids, _ = tokenize_prompt(tok, text)
    rest, windows = list(plain), []
    while len(rest) > 75:
        commas = [i for i in range(75) if rest[i] == COMMA and rest[75] != COMMA and 75 - i <= 20]
        cut = commas[-1] + 1 if commas else 75
        windows.append(expected_window(tok, rest[:cut]))
        rest = rest[cut:]
    windows.append(expected_window(tok, rest))
    np.testing.assert_array_equal(ids, np.stack(windows))
    hard_cut = tokenize_prompt(tok, text, comma_backtrack=0)[0]
    assert ids.shape != hard_cut.shape or not np.array_equal(ids, hard_cut)  # the backtrack did move a phrase


def test_comma_backtrack_and_break(tokenizers):
    tok = tokenizers["sd15"][0]
    cat, dog = tok.encode_plain("cat")[0], tok.encode_plain("dog")[0]
    near = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 20)  # comma at position 60: 15 from the end
    ids, _ = tokenize_prompt(tok, near)
    np.testing.assert_array_equal(ids[0], expected_window(tok, [cat] * 60 + [COMMA]))
    np.testing.assert_array_equal(ids[1], expected_window(tok, [dog] * 20))
    ids, _ = tokenize_prompt(tok, near, comma_backtrack=0)
    np.testing.assert_array_equal(ids[0], expected_window(tok, [cat] * 60 + [COMMA] + [dog] * 14))
    np.testing.assert_array_equal(ids[1], expected_window(tok, [dog] * 6))
    far = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30)  # 25 from the end: a hard cut at 75
    ids, _ = tokenize_prompt(tok, far)
    np.testing.assert_array_equal(ids[1], expected_window(tok, [dog] * 6))

    ids, weights = tokenize_prompt(tok, "a cat BREAK a (dog:1.2)")
    np.testing.assert_array_equal(
        ids, [expected_window(tok, tok.encode_plain("a cat")), expected_window(tok, [320, dog])]
    )
    assert weights[1, 2] == np.float32(1.2) and np.sum(weights != 1) == 1
    assert tokenize_prompt(tok, "BREAK cat")[0].shape == (2, L)  # a leading BREAK leaves an empty window (A1111)


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_prompts_and_negatives_share_the_window_count(tokenizers, name):
    tok, ref = tokenizers[name]
    ids, weights = tokenize_prompts(tok, ["a cat", LONG], "ugly, (blurry:1.3)")
    assert ids.shape == weights.shape == (4, 2 * L)
    empty = hf_ids(ref, [""])[0]
    np.testing.assert_array_equal(ids[0, :L], tokenize_prompt(tok, "ugly, (blurry:1.3)")[0][0])  # negatives first
    np.testing.assert_array_equal(ids[0, L:], empty)  # padded with empty-prompt windows
    np.testing.assert_array_equal(ids[2], np.concatenate([hf_ids(ref, ["a cat"])[0], empty]))
    assert np.all(weights[:, L:][[0, 1, 2]] == 1)
    np.testing.assert_array_equal(tokenize_prompts(tok, "a cat")[0], hf_ids(ref, ["", "a cat"]))
    assert tokenize_prompts(tok, "a cat", min_windows=3)[0].shape == (2, 3 * L)
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        tokenize_prompts(tok, ["a"], ["b", "c"])


# ---------------------------------------------------------------------- encoding


def build_model(root, clip, tokenizer_from):
    """A tiny random torch CLIP text encoder (plus minimal UNet/VAE) saved as a folder and loaded by sdjax."""
    unet = build_unet(
        dict(
            block_out_channels=[8, 16],
            layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=2,
            cross_attention_dim=clip["hidden_size"],
            norm_num_groups=4,
            sample_size=8,
        )
    )
    vae = build_vae(
        dict(
            block_out_channels=[8],
            layers_per_block=1,
            down_block_types=["DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D"],
            norm_num_groups=4,
            latent_channels=4,
            sample_size=8,
        )
    )
    text = build_text_encoder(clip)
    folder = save_folder(root, unet, vae, text, tokenizer_from=tokenizer_from)
    return text, sdjax.load_pipeline(folder)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("sd1"), TINY_CLIP["sd1"], SD15)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("sd2"), TINY_CLIP["sd2"], SD21)


@functools.cache
def jitted_encoder(text_encoder, clip_skip):
    return jax.jit(functools.partial(encode_prompt_windows, text_encoder, clip_skip=clip_skip))


def encode(pipe, ids, weights, clip_skip=None):
    return jitted_encoder(pipe.text_encoder, clip_skip)(pipe.params["text_encoder"], ids, weights)


def torch_embedding(text, ids, clip_skip=None):
    """diffusers' StableDiffusionPipeline.encode_prompt for these ids (fp32).

    diffusers reads `text_encoder.text_model.final_layer_norm`; transformers 5.23's CLIPTextModel has no
    `text_model` wrapper any more (its layers sit on the model itself), so look the norm up either way.
    """
    with torch.no_grad():
        out = text(torch.from_numpy(np.asarray(ids)).long(), output_hidden_states=True)
        if clip_skip is None:
            return out.last_hidden_state.numpy()
        return getattr(text, "text_model", text).final_layer_norm(out.hidden_states[-(clip_skip + 1)]).numpy()


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_plain_prompt_gives_diffusers_embedding(sd1, tokenizers, clip_skip):
    text, pipe = sd1
    prompts = PLAIN[:3]
    ids, weights = tokenize_batch(pipe.tokenizer, prompts)
    np.testing.assert_array_equal(ids, hf_ids(tokenizers["sd15"][1], prompts))
    context = encode(pipe, ids, weights, clip_skip)
    assert context.shape == (3, L, 32) and context.dtype == jnp.float32
    assert rel_l2(context, torch_embedding(text, ids, clip_skip)) <= TOL
    if clip_skip is None:  # the emphasis step is skipped exactly: eager result == the encoder's own output
        eager = encode_prompt_windows(pipe.text_encoder, pipe.params["text_encoder"], ids, weights)
        direct = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, ids).last_hidden_state
        np.testing.assert_array_equal(eager, direct)


def test_sd2_tokenizer_embedding(sd2, tokenizers):
    text, pipe = sd2
    assert pipe.tokenizer.pad_token_id == 0
    prompts = ["wow! a cat!!", LONG]
    ids, weights = tokenize_batch(pipe.tokenizer, prompts)
    assert ids.shape == (2, 2 * L)
    np.testing.assert_array_equal(ids[0, :L], hf_ids(tokenizers["sd21"][1], prompts[:1])[0])
    assert np.all(ids[1, L:][np.argmax(ids[1, L:] == EOS) + 1 :] == 0)  # pad 0 after each window's EOS
    context = encode(pipe, ids, weights, 1)
    windows = ids.reshape(4, L)
    assert rel_l2(context.reshape(4, L, -1), torch_embedding(text, windows, 1)) <= TOL


def test_long_prompt_is_windows_encoded_separately(sd1):
    text, pipe = sd1
    ids, weights = tokenize_batch(pipe.tokenizer, [LONG, "a cat"])
    assert ids.shape == (2, 2 * L)
    context = np.asarray(encode(pipe, ids, weights))
    for row in range(2):
        for w in range(2):
            window = ids[row : row + 1, w * L : (w + 1) * L]
            part = context[row : row + 1, w * L : (w + 1) * L]
            assert rel_l2(part, torch_embedding(text, window)) <= TOL
            assert rel_l2(part, encode(pipe, window, np.ones_like(window, np.float32))) <= TOL


def test_emphasis_scales_tokens_and_keeps_the_mean(sd1):
    _, pipe = sd1
    ids, weights = tokenize_batch(pipe.tokenizer, ["a photo of a (red:1.5) [cat] BREAK a plain window"])
    assert sorted(set(weights.ravel().tolist())) == [np.float32(1 / 1.1), 1.0, 1.5]
    ones = np.ones_like(weights)
    plain = np.asarray(encode(pipe, ids, ones), np.float64).reshape(2, L, -1)
    emphasized = np.asarray(encode(pipe, ids, weights), np.float64).reshape(2, L, -1)

    w = weights.reshape(2, L, 1).astype(np.float64)
    expected = plain[0] * w[0] * (plain[0].mean() / (plain[0] * w[0]).mean())  # A1111's "Original" emphasis
    assert rel_l2(emphasized[0], expected) <= TOL
    assert rel_l2(emphasized[0], plain[0]) > 1e-2
    np.testing.assert_allclose(emphasized[0].mean(), plain[0].mean(), rtol=1e-5)
    np.testing.assert_array_equal(emphasized[1], plain[1])  # a window of weight 1 is untouched, bit for bit


def test_new_prompts_do_not_recompile(sd1):
    _, pipe = sd1
    traces = []

    def fn(params, ids, weights):
        traces.append(ids.shape)
        return encode_prompt_windows(pipe.text_encoder, params, ids, weights, clip_skip=2)

    encode_jit = jax.jit(fn)
    params = pipe.params["text_encoder"]
    for prompts, negatives in ((["a cat"], None), (["(a dog:1.3) in snow"], "[ugly], blurry"), (["x BREAK"], None)):
        ids, weights = tokenize_prompts(pipe.tokenizer, prompts, negatives)
        encode_jit(params, ids, weights).block_until_ready()
    assert len(traces) == 1 and encode_jit._cache_size() == 1
    encode_jit(params, *tokenize_prompts(pipe.tokenizer, [LONG])).block_until_ready()
    assert traces == [(2, L), (2, 2 * L)]  # only a new window count compiles again

"""LoRA: kohya-ss and diffusers/PEFT files, UNet and text encoder, merged and as adapters.

Parity: the same file applied by diffusers (`load_lora_weights`, then `fuse_lora(lora_scale=...)`) and by
sdjax gives the same UNet and text-encoder outputs (fp32, rel. L2 <= 1e-5), merged and unmerged. PEFT
files are made by peft itself (`add_adapter`, `save_lora_weights`). Files with per-module alphas are
compared with a direct numpy computation (diffusers 0.42 applies kohya alphas wrongly there).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jax
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
    kohya_lora_file,
    lora_targets,
    nchw,
    nhwc,
    rel_l2,
    save_folder,
)

import sdjax
from sdjax.convert import ldm_keys
from sdjax.convert import lora as L
from sdjax.convert.diffusers_folder import TEXT_ENCODER, UNET, keymap_for
from sdjax.convert.keymap import params_to_torch
from sdjax.convert.tensor_files import SafetensorsFile, save_safetensors
from sdjax.nn.lora import apply_adapters
from sdjax.prompts import LoraTag, parse_lora_tags

TOL = 1e-5
SCALE = 0.7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Torch models, the sdjax pipeline loaded from them, test inputs and the sdjax outputs without LoRA."""
    root = tmp_path_factory.mktemp("lora")
    torch_models = {"unet": build_unet(SMALL_UNET, seed=3), "vae": build_vae(SMALL_VAE, seed=4)}
    torch_models["text_encoder"] = build_text_encoder(SMALL_CLIP, seed=5)
    pipe = sdjax.load_pipeline(save_folder(root / "model", **torch_models))
    rng = np.random.default_rng(0)
    inputs = dict(
        x=rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
        t=np.array([3.0, 801.0], np.float32),
        ctx=rng.standard_normal((2, 77, 32)).astype(np.float32),
        ids=pipe.tokenizer(["a photo of an astronaut riding a horse", "a cat"]),
    )
    return dict(torch=torch_models, pipe=pipe, inputs=inputs, root=root, base=_sdjax_outputs(pipe.params, pipe, inputs))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(unet, text_encoder, params, x, t, ctx, ids):
    """UNet and text-encoder outputs of `params`: one program for every set of weights of these modules."""
    out = unet.apply({"params": params["unet"]}, x, t, ctx)
    return out, text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state


def _sdjax_outputs(params, pipe, inputs):
    parts = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
    unet, text = _forward(pipe.unet, pipe.text_encoder, parts, inputs["x"], inputs["t"], inputs["ctx"], inputs["ids"])
    return np.asarray(unet), np.asarray(text)


def _diffusers_outputs(model, path: Path, scale: float):
    """UNet and text-encoder outputs of a diffusers pipeline (fresh copies of the torch models) with the LoRA
    file loaded by `load_lora_weights` and fused by `fuse_lora(lora_scale=scale)`."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    models = {k: copy.deepcopy(v) for k, v in model["torch"].items()}
    pipe = StableDiffusionPipeline(
        **models,
        tokenizer=CLIPTokenizer.from_pretrained(SD15 / "tokenizer"),
        scheduler=PNDMScheduler.from_pretrained(SD15 / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    i = model["inputs"]
    with torch.no_grad():
        unet = nhwc(pipe.unet(nchw(i["x"]), torch.from_numpy(i["t"]), torch.from_numpy(i["ctx"])).sample)
        text = pipe.text_encoder(torch.from_numpy(i["ids"].astype(np.int64))).last_hidden_state.numpy()
    return unet, text


@pytest.fixture(scope="module")
def kohya(model):
    return kohya_lora_file(model["root"] / "kohya.safetensors", model["torch"], seed=1)


def _peft_file(folder: Path, model, metadata: bool, text_model_prefix: bool) -> Path:
    """A diffusers/PEFT LoRA made by peft itself, with per-module ranks and alphas in its LoraConfig."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(7)
    unet, text = copy.deepcopy(model["torch"]["unet"]), copy.deepcopy(model["torch"]["text_encoder"])
    unet_config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2"],
        rank_pattern={"conv1": 2},
        alpha_pattern={"to_k": 3.0, "conv2": 1.0},
        init_lora_weights=False,
    )
    text_config = LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        alpha_pattern={"fc1": 2.0},
        init_lora_weights=False,
    )
    unet.add_adapter(unet_config)
    text.add_adapter(text_config)
    unet_layers = {k: 0.2 * v for k, v in get_peft_model_state_dict(unet).items()}
    text_layers = get_peft_model_state_dict(text)
    if text_model_prefix:
        text_layers = {f"text_model.{k}": v for k, v in text_layers.items()}
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=unet_config.to_dict() if metadata else None,
        text_encoder_lora_adapter_metadata=text_config.to_dict() if metadata else None,
    )
    return folder / "pytorch_lora_weights.safetensors"


def _check(model, ours, theirs, what):
    """sdjax outputs (unet, text) vs diffusers', and the LoRA must change both noticeably."""
    err = {"unet": rel_l2(ours[0], theirs[0]), "text_encoder": rel_l2(ours[1], theirs[1])}
    effect = {"unet": rel_l2(theirs[0], model["base"][0]), "text_encoder": rel_l2(theirs[1], model["base"][1])}
    print(what, "error", err, "lora effect", effect)
    assert max(err.values()) <= TOL, (what, err)
    assert min(effect.values()) > 1e-2, (what, effect)


def _jitted_forward(pipe):
    """UNet and text encoder with unmerged adapters: one compiled program for any scales and any adapters
    of the same shapes."""

    def forward(params, adapters, scales, x, t, ctx, ids):
        return _forward(pipe.unet, pipe.text_encoder, apply_adapters(params, adapters, scales), x, t, ctx, ids)

    return jax.jit(forward)


def test_kohya_matches_diffusers_merged_and_unmerged_without_recompiling(model, kohya):
    pipe, i = model["pipe"], model["inputs"]
    theirs = _diffusers_outputs(model, kohya, SCALE)
    merged = pipe.load_lora(kohya, SCALE)
    _check(model, _sdjax_outputs(merged.params, merged, i), theirs, "kohya merged")
    assert merged.params is not pipe.params and jax.tree.leaves(pipe.params)[0] is not None  # pipe unchanged

    forward = _jitted_forward(pipe)
    adapter = L.lora_adapter(pipe, kohya)
    args = (i["x"], i["t"], i["ctx"], i["ids"])
    unmerged = forward(pipe.params, [adapter], np.array([SCALE], np.float32), *args)
    _check(model, unmerged, theirs, "kohya unmerged")

    # Another scale, then another LoRA of the same shapes: the same compiled program.
    off = forward(pipe.params, [adapter], np.array([0.0], np.float32), *args)
    assert rel_l2(off[0], model["base"][0]) <= TOL and rel_l2(off[1], model["base"][1]) <= TOL
    other_file = kohya_lora_file(
        model["root"] / "kohya_other.safetensors", model["torch"], seed=2, alpha=lambda r, n: 3.0
    )
    other = L.lora_adapter(pipe, other_file)
    swapped = forward(pipe.params, [other], np.array([1.0], np.float32), *args)
    expected = _sdjax_outputs(pipe.load_lora(other_file).params, pipe, i)
    assert rel_l2(swapped[0], expected[0]) <= TOL and rel_l2(swapped[1], expected[1]) <= TOL
    assert forward._cache_size() == 1


@pytest.mark.parametrize("metadata", [True, False], ids=["with_metadata", "no_metadata_text_model_prefix"])
def test_peft_matches_diffusers_merged_and_unmerged(model, metadata, tmp_path):
    """PEFT files with per-module ranks and alphas (alpha_pattern, applied by PEFT itself in diffusers), and
    without metadata, where alpha = rank (text-encoder keys then carry the old `text_model.` prefix)."""
    path = _peft_file(tmp_path, model, metadata=metadata, text_model_prefix=not metadata)
    pipe, i = model["pipe"], model["inputs"]
    theirs = _diffusers_outputs(model, path, SCALE)
    merged = pipe.load_lora(path, SCALE)
    _check(model, _sdjax_outputs(merged.params, merged, i), theirs, f"peft merged {metadata=}")
    params = apply_adapters(pipe.params, [L.lora_adapter(pipe, path)], np.array([SCALE], np.float32))
    _check(model, _sdjax_outputs(params, pipe, i), theirs, f"peft unmerged {metadata=}")


def _numpy_merge(pipe, files_and_scales) -> dict[str, dict[str, np.ndarray]]:
    """W + sum scale * alpha / rank * up @ down in float64, PyTorch layout, straight from the kohya files."""
    out = {}
    for part, spec, prefix in (("unet", UNET, "lora_unet_"), ("text_encoder", TEXT_ENCODER, "lora_te_text_model_")):
        torch_named = params_to_torch(pipe.params[part], keymap_for(spec, getattr(pipe, part)))
        weights = {k: v.astype(np.float64) for k, v in torch_named.items()}
        for path, scales in files_and_scales:
            tensors = SafetensorsFile(path)
            for key in tensors:
                if not (key.startswith(prefix) and key.endswith(".lora_down.weight")):
                    continue
                stem = key.removesuffix(".lora_down.weight")
                down = tensors[key].astype(np.float64)
                up = tensors[stem + ".lora_up.weight"].astype(np.float64)
                rank = down.shape[0]
                alpha = float(tensors[stem + ".alpha"]) if stem + ".alpha" in tensors else rank
                name = next(k for k in weights if k.replace(".", "_") == stem.removeprefix(prefix) + "_weight")
                delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
                weights[name] = weights[name] + scales[part] * alpha / rank * delta.reshape(weights[name].shape)
        out[part] = weights
    return out


def _assert_merged(pipe, params, expected):
    for part, spec in (("unet", UNET), ("text_encoder", TEXT_ENCODER)):
        ours = params_to_torch(params[part], keymap_for(spec, getattr(pipe, part)))
        for key, value in expected[part].items():
            np.testing.assert_allclose(ours[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_per_module_alpha_against_numpy(model):
    """kohya alphas differ per module (and some are missing: alpha = rank); merged = the direct formula."""
    path = kohya_lora_file(
        model["root"] / "alphas.safetensors",
        model["torch"],
        seed=3,
        alpha=lambda rng, name: None if "ff" in name else float(rng.choice([0.5, 1.0, 4.0, 8.0])),
    )
    pipe = model["pipe"]
    scale = {"unet": 0.8, "text_encoder": 0.4}
    _assert_merged(pipe, pipe.load_lora(path, scale).params, _numpy_merge(pipe, [(path, scale)]))


def test_several_loras_at_once(model, kohya):
    pipe = model["pipe"]
    other = kohya_lora_file(model["root"] / "second.safetensors", model["torch"], seed=4, alpha=lambda r, n: 1.0)
    scales = {"unet": np.array([0.7, -0.3], np.float32), "text_encoder": np.array([0.2, 1.0], np.float32)}
    adapters = [L.lora_adapter(pipe, kohya), L.lora_adapter(pipe, other)]
    both = apply_adapters(pipe.params, adapters, scales)
    expected = _numpy_merge(
        pipe,
        [(kohya, {"unet": 0.7, "text_encoder": 0.2}), (other, {"unet": -0.3, "text_encoder": 1.0})],
    )
    _assert_merged(pipe, both, expected)


def test_ldm_named_kohya_file(model, kohya, tmp_path):
    """kohya files made on the original (LDM) UNet name its modules that way (input_blocks_1_1_proj_in)."""
    pipe = model["pipe"]
    rules = ldm_keys.unet_rules(pipe.unet.config)
    names = {}
    for name in lora_targets(model["torch"]["unet"]):
        (entry,) = ldm_keys.build_entries(rules, [name + ".weight"], "")
        names[name] = entry.ldm_key.removesuffix(".weight")
    assert names["down_blocks.0.attentions.0.proj_in"] == "input_blocks.1.1.proj_in"
    ldm_file = kohya_lora_file(tmp_path / "ldm.safetensors", model["torch"], seed=1, names=names)
    a, b = pipe.load_lora(kohya).params, pipe.load_lora(ldm_file).params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(x, y)


# ---------------------------------------------------------------------------------------------- bad files


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_lora_that_does_not_fit(model, kohya, tmp_path):
    pipe = model["pipe"]
    tensors = dict(SafetensorsFile(kohya))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    tensors[key] = np.zeros((4, 48), np.float32)  # made for a 48-wide (SD 2-like) context
    bad = tmp_path / "bad.safetensors"
    save_safetensors(bad, tensors)
    with pytest.raises(L.LoraError) as err:
        pipe.load_lora(bad)
    assert "attn2_to_k" in _one_line(err) and "does not fit" in str(err.value)

    tensors = dict(SafetensorsFile(kohya))
    tensors["lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight"] = np.zeros((2, 16, 3, 3), np.float32)
    tensors["lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight"] = np.zeros((16, 2, 1, 1), np.float32)
    save_safetensors(bad, tensors)
    with pytest.raises(L.LoraError) as err:
        pipe.load_lora(bad)
    assert "down_blocks_7_resnets_0_conv1" in _one_line(err)


def test_bad_lora_files(model, kohya, tmp_path):
    pipe = model["pipe"]
    data = kohya.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        pipe.load_lora(cut)
    assert "truncated" in _one_line(err)
    z = np.zeros((2, 2), np.float32)
    cases = {
        "loha": ({"lora_unet_x.hada_w1_a": z, "lora_unet_x.hada_w1_b": z}, "LoHa"),
        "not_lora": ({"model.diffusion_model.input_blocks.0.0.weight": z}, "not a LoRA"),
        "half": ({"lora_unet_conv_in.lora_down.weight": z}, "no up weight"),
    }
    for name, (tensors, words) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_safetensors(path, tensors)
        with pytest.raises(L.LoraError) as err:
            L.read_lora(path)
        assert words in _one_line(err), name
    sdxl = tmp_path / "sdxl.safetensors"  # readable, but SD 1.x has no second text encoder
    save_safetensors(sdxl, {"lora_te2_x.lora_down.weight": z, "lora_te2_x.lora_up.weight": z})
    with pytest.raises(L.LoraError) as err:
        pipe.load_lora(sdxl)
    assert "has weights for text_encoder_2, which this model does not have" in _one_line(err)


def test_pickled_lora(model, kohya, tmp_path):
    """A kohya `.pt` LoRA goes through torch.load(weights_only=True) and merges like the safetensors one."""
    pt = tmp_path / "lora.pt"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in SafetensorsFile(kohya).items()}, pt)
    a, b = model["pipe"].load_lora(pt).params, model["pipe"].load_lora(kohya).params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(x, y)


# ---------------------------------------------------------------------------------------------- CLI helpers


def test_prompt_tags():
    prompt = "a photo of <lora:pixel-art:0.8> a cat, <lora:styles/ink> <lyco:sketch:0.5:1.2> <lora:x:unet=0.3>"
    cleaned, tags = parse_lora_tags(prompt)
    assert cleaned == "a photo of a cat,"
    assert tags == [
        LoraTag("pixel-art", 0.8, 0.8),
        LoraTag("styles/ink", 1.0, 1.0),
        LoraTag("sketch", 0.5, 1.2),
        LoraTag("x", 1.0, 0.3),
    ]
    assert tags[2].scale == {"unet": 1.2, "text_encoder": 0.5}
    assert parse_lora_tags("no tags (here:1.2)") == ("no tags (here:1.2)", [])
    with pytest.raises(ValueError, match="bad LoRA weight"):
        parse_lora_tags("<lora:a:strong>")


def test_find_lora_and_lora_arg(tmp_path):
    (tmp_path / "styles").mkdir()
    for name in ("pixel-art.safetensors", "styles/ink.safetensors", "styles/ink.pt", "twice.pt", "styles/twice.pt"):
        (tmp_path / name).write_bytes(b"")
    assert L.find_lora("pixel-art", tmp_path) == tmp_path / "pixel-art.safetensors"
    assert L.find_lora("ink", tmp_path) == tmp_path / "styles" / "ink.safetensors"  # safetensors preferred
    assert L.find_lora("styles/ink", tmp_path) == tmp_path / "styles" / "ink.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        L.find_lora("missing", tmp_path)
    assert "missing" in _one_line(err)
    with pytest.raises(ValueError) as err:
        L.find_lora("twice", tmp_path)
    assert "ambiguous" in _one_line(err)
    import sample  # the command line, sample.py at the repository root

    assert sample.parse_lora_arg("loras/a.safetensors:0.6") == (Path("loras/a.safetensors"), 0.6)
    assert sample.parse_lora_arg("loras/a.safetensors") == (Path("loras/a.safetensors"), 1.0)
    assert sample.parse_lora_arg("C:/loras/a.safetensors") == (Path("C:/loras/a.safetensors"), 1.0)


def test_written_lora_files_read_back_to_the_same_adapter(model, tmp_path):
    """`lora_file_tensors` (what train/ exports) and the readers are inverses, in both formats: linear and
    conv modules of the UNet and text-encoder modules come back as the same factors and multiplier."""
    pipe = model["pipe"]
    rng = np.random.default_rng(7)
    rank, alpha = 2, 3.0
    chosen = {
        "unet": ["down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q", "down_blocks.0/resnets.0/conv1"],
        "text_encoder": ["encoder.layers.0/self_attn/k_proj"],
    }
    factors = {}
    for part, paths in chosen.items():
        kernels = L._kernels(pipe.params[part])
        factors[part] = {}
        for path in paths:
            shape = kernels[tuple(path.split("/"))]
            a = rng.standard_normal((*shape[:-1], rank)).astype(np.float32)
            factors[part][path] = {"A": a, "B": rng.standard_normal((rank, shape[-1])).astype(np.float32)}
    peft, kohya, metadata = L.lora_file_tensors(factors, rank, alpha)
    save_safetensors(tmp_path / "peft.safetensors", peft, metadata)
    save_safetensors(tmp_path / "kohya.safetensors", kohya)
    for name in ("peft", "kohya"):
        adapter = L.lora_adapter(pipe, tmp_path / f"{name}.safetensors")
        assert {part: sorted(m) for part, m in adapter.items()} == {p: sorted(m) for p, m in factors.items()}, name
        for part, modules in factors.items():
            for path, factor in modules.items():
                got = adapter[part][path]
                np.testing.assert_array_equal(got["A"], factor["A"])
                np.testing.assert_array_equal(got["B"], factor["B"])
                assert float(got["multiplier"]) == alpha / rank, (name, path)

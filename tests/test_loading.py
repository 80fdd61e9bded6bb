"""Loading diffusers folders: file variants, shards, key prefixes, and one clear error line per bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from reference import TINY_UNET, build_text_encoder, build_unet, build_vae, rel_l2, save_folder

import sdjax
from sdjax.convert import keymap
from sdjax.convert.keymap import ConversionError
from sdjax.convert.tensor_files import (
    HOST_ALIGNMENT,
    SafetensorsError,
    SafetensorsFile,
    aligned_empty,
    save_safetensors,
)

VAE = dict(
    block_out_channels=[16, 32],
    layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=8,
)
CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def models():
    return build_unet(TINY_UNET), build_vae(VAE), build_text_encoder(CLIP)


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    return save_folder(tmp_path_factory.mktemp("tiny"), *models)


@pytest.fixture
def copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_missing_component_folder(copy):
    shutil.rmtree(copy / "vae")
    with pytest.raises(FileNotFoundError) as info:
        sdjax.load_pipeline(copy)
    assert "'vae/'" in one_line_error(info)


def test_missing_path_and_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        sdjax.load_pipeline(tmp_path / "nowhere")
    assert "does not exist" in one_line_error(info)
    with pytest.raises(FileNotFoundError) as info:
        sdjax.load_pipeline(tmp_path)
    assert "model_index.json" in one_line_error(info)


def test_folder_options(folder, models):
    """prediction_type replaces the scheduler's; vae= takes a diffusers VAE folder; config= is for files."""
    pipe = sdjax.load_pipeline(folder, prediction_type="v_prediction", vae=folder / "vae")
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    plain = sdjax.load_pipeline(folder)
    assert plain.scheduler_config.get("prediction_type", "epsilon") == "epsilon"
    for ours, theirs in zip(jax.tree.leaves(pipe.params["vae"]), jax.tree.leaves(plain.params["vae"]), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError) as info:
        sdjax.load_pipeline(folder, prediction_type="eps")
    assert "prediction_type must be one of" in one_line_error(info)
    with pytest.raises(ValueError) as info:
        sdjax.load_pipeline(folder, config=folder)
    assert "single-file" in one_line_error(info)


def test_truncated_safetensors(copy):
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError) as info:
        sdjax.load_pipeline(copy)
    message = one_line_error(info)
    assert "truncated" in message and str(weights) in message


def test_garbage_instead_of_safetensors(copy):
    (copy / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(SafetensorsError) as info:
        sdjax.load_pipeline(copy)
    assert "not a safetensors file" in one_line_error(info)


def test_weight_of_the_wrong_shape(copy):
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = {k: np.array(v) for k, v in SafetensorsFile(path).items()}
    tensors["conv_in.weight"] = tensors["conv_in.weight"][:, :3]
    save_safetensors(path, tensors)
    with pytest.raises(ConversionError) as info:
        sdjax.load_pipeline(copy)
    message = one_line_error(info)
    assert "conv_in.weight (32, 3, 3, 3) (expected (32, 4, 3, 3))" in message


def test_missing_and_unexpected_keys_are_named(copy):
    path = copy / "text_encoder" / "model.safetensors"
    tensors = {k: np.array(v) for k, v in SafetensorsFile(path).items()}
    tensors["encoder.layers.9.mlp.fc1.weight"] = tensors.pop("encoder.layers.1.mlp.fc1.weight")
    save_safetensors(path, tensors)
    with pytest.raises(ConversionError) as info:
        sdjax.load_pipeline(copy)
    message = one_line_error(info)
    assert "1 missing: encoder.layers.1.mlp.fc1.weight" in message
    assert "1 unexpected: encoder.layers.9.mlp.fc1.weight" in message


def test_unknown_block_type(copy):
    cfg_path = copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["down_block_types"][1] = "AttnDownBlock2D"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        sdjax.load_pipeline(copy)
    message = one_line_error(info)
    assert "unknown down block type 'AttnDownBlock2D'" in message and "CrossAttnDownBlock2D" in message


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("class_embed_type", "timestep", "option class_embed_type='timestep' is not supported"),
        ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift' is not supported"),
        ("fancy_new_option", 3, "unknown option 'fancy_new_option'"),
        ("addition_embed_type", "image", "addition_embed_type 'image' is not supported"),
    ],
)
def test_unsupported_unet_options_are_refused(copy, key, value, expected):
    cfg_path = copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        sdjax.load_pipeline(copy)
    assert expected in one_line_error(info)


def test_text_addition_embedding_heads_must_divide_the_width(copy):
    cfg_path = copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(addition_embed_type="text", addition_embed_type_num_heads=5)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        sdjax.load_pipeline(copy)
    assert "divisible by addition_embed_type_num_heads (5)" in one_line_error(info)


def test_only_pickle_weights(copy):
    (copy / "vae" / "diffusion_pytorch_model.safetensors").rename(copy / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as info:
        sdjax.load_pipeline(copy)
    assert "only PyTorch pickle weights" in one_line_error(info)


def test_fp16_variant_sharded_files_and_prefixes(models, tmp_path):
    """fp16 variant files, a sharded text encoder without the `text_model.` prefix, legacy VAE names."""
    unet, vae, text = models
    root = save_folder(tmp_path / "m", unet, vae, text)
    shutil.rmtree(root / "unet")
    unet.save_pretrained(root / "unet", variant="fp16")  # diffusion_pytorch_model.fp16.safetensors
    shutil.rmtree(root / "text_encoder")
    text.save_pretrained(root / "text_encoder", max_shard_size="20KB")
    assert (root / "text_encoder" / "model.safetensors.index.json").is_file()
    vae_file = root / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in SafetensorsFile(vae_file).items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        tensors[key] = np.array(value)
    save_safetensors(vae_file, tensors)

    pipe = sdjax.load_pipeline(root)
    ref = sdjax.load_pipeline(save_folder(tmp_path / "ref", unet, vae, text))
    for ours, theirs in zip(jax.tree.leaves(pipe.params), jax.tree.leaves(ref.params), strict=True):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)  # fp16 storage of the UNet
    te = jax.tree.leaves(pipe.params["text_encoder"])
    assert all(np.array_equal(a, b) for a, b in zip(te, jax.tree.leaves(ref.params["text_encoder"]), strict=True))
    ids = np.full((1, 77), 49407)
    ids[0, :3] = [49406, 320, 1929]
    out = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, ids)[0]
    with torch.no_grad():
        assert rel_l2(out, text(torch.from_numpy(ids)).last_hidden_state) <= 1e-5


def test_safetensors_round_trip_bf16(tmp_path):
    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.linspace(-2, 2, 7).astype(ml_dtypes.bfloat16),
        "c": np.zeros((0, 2), np.float16),
        "d": np.array(5, np.int64),
    }
    save_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = SafetensorsFile(tmp_path / "x.safetensors")
    assert back.metadata == {"format": "pt"}
    assert sorted(back) == sorted(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value)
    from safetensors.torch import load_file as torch_load  # the reference reader (numpy has no bf16)

    loaded = torch_load(tmp_path / "x.safetensors")
    assert loaded["b"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["b"].float().numpy(), tensors["b"].astype(np.float32))


def test_shapes_only_pipeline_compiles_the_program_the_weights_run(folder, tmp_path):
    """load_pipeline(weights=False) reads no weights, yet its params have exactly the loaded shapes and
    dtypes, and a program compiled from it draws the image `generate` draws."""
    from sdjax.generate import compile_generate, place_inputs
    from sdjax.request import prepare

    shapes = sdjax.load_pipeline(folder, dtype="bfloat16", weights=False)
    pipe = sdjax.load_pipeline(folder, dtype="bfloat16")
    structs = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert structs(shapes.params) == structs(pipe.params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes.params))

    settings = dict(num_inference_steps=3, height=64, width=64, seed=3, mesh=None)
    plan, inputs = prepare(shapes, ["a red cube"], **settings)
    program = compile_generate(shapes, plan, place_inputs(inputs, None), params=shapes.params)
    drawn = np.asarray(program(pipe.params, place_inputs(inputs, None)).images)
    np.testing.assert_array_equal(drawn, np.asarray(pipe.generate(["a red cube"], **settings)))

    swapped = sdjax.load_pipeline(folder, dtype="bfloat16", weights=False, vae=folder / "vae")  # a VAE folder
    assert structs(swapped.params) == structs(pipe.params)


@pytest.mark.parametrize(
    "shape, layout",
    [((700, 300), "linear"), ((300, 700), "linear"), ((320, 4, 3, 3), "conv"), ((640, 320, 3, 3), "conv"),
     ((640, 320, 1, 1), "conv"), ((320,), "copy"), ((5, 7), "linear")],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_layout_changes_into_aligned_buffers_equal_numpy(shape, layout, dtype):
    """The loader's layout changes (into aligned buffers a CPU device adopts) are numpy's."""
    source = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours = keymap._jax_layout(source, layout, dtype)
    assert ours.dtype == dtype and ours.flags.c_contiguous and ours.ctypes.data % HOST_ALIGNMENT == 0
    np.testing.assert_array_equal(ours, np.ascontiguousarray(keymap._TO_JAX[layout](source)).astype(dtype))


def test_loaded_params_never_share_the_callers_arrays():
    """Only a reader's fresh arrays are adopted without a copy: a caller's dict stays its own."""
    entry = keymap.Entry(torch_key="w", path=("w",), layout="copy", shape=(64, 64))
    source = {"w": aligned_empty((64, 64), np.float32)}
    source["w"][...] = 1.0
    params = keymap.torch_to_params(source, {"w": entry})
    source["w"][...] = 2.0
    np.testing.assert_array_equal(params["w"], np.ones((64, 64), np.float32))


def test_parameter_shapes_are_traced_once_per_architecture(tmp_path, monkeypatch):
    """abstract_params traces a module once, writes its shapes to the cache folder, and a later process (here:
    the in-process memo cleared) reads them instead of tracing: the same tree, shapes and dtypes. Another
    config is another entry; a damaged entry is traced again and rewritten; with the cache off nothing is
    written. The folder is param-shapes/ in the compilation cache in use."""
    from sdjax.convert import param_shapes
    from sdjax.nn.unet import UNet2DConditionModel, UNetConfig

    monkeypatch.setattr(param_shapes, "_directory", lambda: tmp_path / "cache" / "param-shapes")
    module = UNet2DConditionModel(UNetConfig.from_dict(dict(TINY_UNET)))
    param_shapes._remembered.cache_clear()
    traced = param_shapes.abstract_params(module)
    entries = list((tmp_path / "cache" / "param-shapes").glob("*.json"))
    assert len(entries) == 1

    param_shapes._remembered.cache_clear()
    calls = []
    real = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = param_shapes.abstract_params(module)
    assert not calls
    flat = lambda tree: [(p, s.shape, s.dtype) for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]]  # noqa: E731
    assert flat(cached) == flat(traced) and len(flat(cached)) > 50

    wider = UNet2DConditionModel(UNetConfig.from_dict(dict(TINY_UNET, block_out_channels=[32, 96])))
    param_shapes.abstract_params(wider)
    assert len(calls) == 1 and len(list(entries[0].parent.glob("*.json"))) == 2

    entries[0].write_text("{not json")
    param_shapes._remembered.cache_clear()
    assert flat(param_shapes.abstract_params(module)) == flat(traced)
    assert len(calls) == 2 and json.loads(entries[0].read_text())["leaves"]

    monkeypatch.setattr(param_shapes, "_directory", lambda: None)  # the compilation cache is off
    param_shapes._remembered.cache_clear()
    shutil.rmtree(tmp_path / "cache")
    assert flat(param_shapes.abstract_params(module)) == flat(traced)
    assert not (tmp_path / "cache").exists()
    monkeypatch.undo()
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        assert param_shapes._directory() is None
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
    configured = jax.config.jax_compilation_cache_dir
    if configured and enabled:
        assert param_shapes._directory() == Path(configured) / "param-shapes"

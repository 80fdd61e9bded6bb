"""Weight files that are not plain float weights: fp8 tensors (read and upcast), integer tensors where weights
belong, NaN/Inf values, config.json values of the wrong type, and code-running pickles named .safetensors.
Each bad file gives one line naming the file and the tensor or field."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdjax
from sdjax.convert.single_file import load_vae
from sdjax.convert.tensor_files import (
    MisnamedPickleError,
    SafetensorsFile,
    TensorDataError,
    UnsupportedDtypeError,
    read_checkpoint,
    save_safetensors,
)
from sdjax.nn.config_utils import ConfigTypeError
from sdjax.testing import random_pipeline

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
TEXT_FILE = "text_encoder/model.safetensors"
FP8 = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("tiny")


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    return pipe.save_pretrained(tmp_path_factory.mktemp("weights") / "model")


@pytest.fixture
def copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "model")


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def read(path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in SafetensorsFile(path).items()}


def rewrite(path, **changes) -> None:
    """The safetensors file at `path` with some tensors replaced."""
    save_safetensors(path, {**read(path), **changes})


# ---------------------------------------------------------------------------------------------- fp8


@pytest.mark.parametrize("name", sorted(FP8))
def test_fp8_folder_loads_as_the_upcast_values(name, copy, tmp_path):
    """A UNet stored in fp8 (written by the safetensors library) loads as its values upcast to the model's
    dtype: equal to loading the same values stored in float32."""
    expected = shutil.copytree(copy, tmp_path / "expected")
    fp8 = {k: torch.from_numpy(v).to(FP8[name]) for k, v in read(copy / UNET_FILE).items()}
    save_file(fp8, copy / UNET_FILE)
    assert json.dumps(name) in (copy / UNET_FILE).read_bytes()[:4096].decode("latin-1")
    save_file({k: v.float() for k, v in fp8.items()}, expected / UNET_FILE)
    ours, theirs = sdjax.load_pipeline(copy), sdjax.load_pipeline(expected)
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params), strict=True):
        np.testing.assert_array_equal(a, b)
    half = sdjax.load_pipeline(copy, dtype="bfloat16").params["unet"]["conv_in"]["kernel"]
    assert half.dtype == jnp.bfloat16
    np.testing.assert_array_equal(half, theirs.params["unet"]["conv_in"]["kernel"].astype(jnp.bfloat16))


def test_every_fp8_dtype_reads_as_torch_does(tmp_path):
    values = torch.tensor([[0.5, -1.25, 3.0], [0.015625, 2.0, -0.75]])
    tensors = {name: values.to(dtype) for name, dtype in FP8.items()}
    tensors["F8_E8M0"] = values.abs().to(torch.float8_e8m0fnu)
    path = tmp_path / "fp8.safetensors"
    save_file(tensors, path)
    ours = SafetensorsFile(path)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(ours[name].astype(np.float32), tensor.float().numpy(), err_msg=name)
    pt = tmp_path / "fp8.pt"
    torch.save(tensors, pt)
    from_pickle = read_checkpoint(pt)
    assert from_pickle["F8_E4M3"].dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(from_pickle["F8_E5M2"].astype(np.float32), tensors["F8_E5M2"].float().numpy())


@pytest.mark.parametrize("dtype", ["F4", "F6_E2M3", "Q4_K"])
def test_unknown_dtype_is_named(dtype, tmp_path):
    path = tmp_path / "odd.safetensors"
    header = json.dumps({"w": {"dtype": dtype, "shape": [2, 2], "data_offsets": [0, 2]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    with pytest.raises(UnsupportedDtypeError) as info:
        SafetensorsFile(path)
    message = one_line(info)
    assert f"unsupported tensor dtype {dtype} for tensor 'w'" in message and str(path) in message


# ---------------------------------------------------------------------------------------------- integers


@pytest.mark.parametrize("dtype", [np.int16, np.int8, np.uint8, np.int32, np.int64, np.bool_])
def test_integer_weights_are_refused(dtype, copy):
    path = copy / UNET_FILE
    weight = read(path)["conv_in.weight"]
    rewrite(path, **{"conv_in.weight": weight.astype(dtype)})
    with pytest.raises(TensorDataError) as info:
        sdjax.load_pipeline(copy)
    message = one_line(info)
    name = {np.int16: "I16", np.int8: "I8", np.uint8: "U8", np.int32: "I32", np.int64: "I64", np.bool_: "BOOL"}
    assert f"tensor 'conv_in.weight' is {name[dtype]}, not a float tensor" in message and str(path) in message


def test_integer_buffers_that_are_not_weights_still_load(copy, pipe):
    """transformers' int64 position_ids buffer, as real text encoders carry it, is skipped, not refused."""
    path = copy / TEXT_FILE
    rewrite(path, **{"text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]})
    loaded = sdjax.load_pipeline(copy)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(pipe.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_integer_tensors_in_single_files_loras_and_embeddings(pipe, folder, tmp_path):
    single = pipe.save_single_file(tmp_path / "model.safetensors")
    key = "first_stage_model.decoder.conv_in.weight"
    rewrite(single, **{key: read(single)[key].astype(np.int8)})
    with pytest.raises(TensorDataError) as info:
        sdjax.load_pipeline(single, config=folder)
    assert f"tensor '{key}' is I8" in one_line(info) and str(single) in str(info.value)

    lora = tmp_path / "lora.safetensors"
    down = "lora_unet_conv_in.lora_down.weight"
    save_safetensors(
        lora, {down: np.ones((2, 4, 3, 3), np.int32), "lora_unet_conv_in.lora_up.weight": np.ones((32, 2))}
    )
    with pytest.raises(TensorDataError) as info:
        pipe.load_lora(lora)
    assert f"tensor '{down}' is I32, not a float tensor" in one_line(info)

    embedding = tmp_path / "emb.safetensors"
    save_safetensors(embedding, {"emb_params": np.ones((2, 32), np.int16)})
    with pytest.raises(TensorDataError) as info:
        pipe.load_textual_inversion(embedding)
    assert "tensor 'emb_params' is I16, not a float tensor" in one_line(info)


# ---------------------------------------------------------------------------------------------- NaN / Inf


def test_non_finite_weights_in_a_folder(copy):
    path = copy / UNET_FILE
    key = "down_blocks.0.attentions.0.proj_in.weight"
    weight = read(path)[key]
    weight.reshape(-1)[[1, 5, 9]] = [np.nan, np.inf, -np.inf]
    rewrite(path, **{key: weight})
    with pytest.raises(TensorDataError) as info:
        sdjax.load_pipeline(copy)
    message = one_line(info)
    assert f"{path}: tensor '{key}' has 3 NaN/Inf values" in message and "damaged" in message
    abstract = sdjax.load_pipeline(copy, weights=False)  # shapes only: nothing read, nothing checked
    assert isinstance(abstract.params["unet"]["conv_in"]["kernel"], jax.ShapeDtypeStruct)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_non_finite_half_precision_weights(dtype, copy):
    path = copy / TEXT_FILE
    key = "text_model.encoder.layers.1.mlp.fc2.bias"
    bias = read(path)[key].astype(dtype)
    bias[-1] = np.nan
    rewrite(path, **{key: bias})
    for load_as in ("float32", "bfloat16", "float16"):
        with pytest.raises(TensorDataError) as info:
            sdjax.load_pipeline(copy, dtype=load_as)
        assert f"tensor '{key}' has 1 NaN/Inf values" in one_line(info), load_as


def test_values_beyond_float16_are_an_overflow_not_damage(copy):
    path = copy / VAE_FILE
    key = "decoder.conv_out.bias"
    rewrite(path, **{key: np.full(read(path)[key].shape, 1e6, np.float32)})
    sdjax.load_pipeline(copy, dtype="bfloat16")  # in range there
    with pytest.raises(TensorDataError) as info:
        sdjax.load_pipeline(copy, dtype="float16")
    message = one_line(info)
    assert f"tensor '{key}' has 3 values beyond the range of float16" in message and "float32" in message


def test_non_finite_values_in_single_files_vae_files_loras_and_embeddings(pipe, folder, tmp_path):
    single = pipe.save_single_file(tmp_path / "model.safetensors")
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    weight = read(single)[key]
    weight.reshape(-1)[:4] = np.nan
    rewrite(single, **{key: weight})
    with pytest.raises(TensorDataError) as info:
        sdjax.load_pipeline(single, config=folder)
    assert f"{single}: tensor '{key}' has 4 NaN/Inf values" in one_line(info)

    vae = shutil.copyfile(folder / VAE_FILE, tmp_path / "vae.safetensors")
    rewrite(vae, **{"encoder.conv_in.bias": np.full(8, np.inf, np.float32)})
    with pytest.raises(TensorDataError) as info:
        load_vae(vae, pipe.vae.config)
    assert f"{vae}: tensor 'encoder.conv_in.bias' has 8 NaN/Inf values" in one_line(info)

    lora = tmp_path / "lora.safetensors"
    up = "lora_unet_conv_in.lora_up.weight"
    save_safetensors(lora, {"lora_unet_conv_in.lora_down.weight": np.ones((2, 4, 3, 3)), up: np.full((32, 2), np.nan)})
    with pytest.raises(TensorDataError) as info:
        pipe.load_lora(lora)
    assert f"tensor '{up}' has 64 NaN/Inf values" in one_line(info)

    embedding = tmp_path / "emb.safetensors"
    save_safetensors(embedding, {"emb_params": np.full((2, 32), np.inf, np.float16)})
    with pytest.raises(TensorDataError) as info:
        pipe.load_textual_inversion(embedding)
    assert "tensor 'emb_params' has 64 NaN/Inf values" in one_line(info)


# ---------------------------------------------------------------------------------------------- config types


@pytest.mark.parametrize(
    "file,key,value,expected",
    [
        ("unet", "layers_per_block", "two", "an integer or a list of integers"),
        ("unet", "block_out_channels", 320, "a list of integers"),
        ("unet", "attention_head_dim", "8", "an integer or a list of integers"),
        ("unet", "use_linear_projection", "false", "a boolean"),
        ("vae", "scaling_factor", "0.18215", "a number"),
        ("vae", "latents_mean", [0.1, None], "a list of numbers or null"),
        ("text_encoder", "num_hidden_layers", 2.0, "an integer"),
    ],
)
def test_config_values_of_the_wrong_type(file, key, value, expected, copy):
    path = copy / file / "config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    for weights in (True, False):
        with pytest.raises(ConfigTypeError) as info:
            sdjax.load_pipeline(copy, weights=weights)
        message = one_line(info)
        assert str(path) in message and f"{key} is {json.dumps(value)}" in message and expected in message


# ---------------------------------------------------------------------------------------------- pickles


class _Payload:
    """Unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_payload_is_live(tmp_path):
    """The control: plain unpickling does run the command (so the tests below mean something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def _evil_files(tmp_path, name: str):
    """A legacy pickle and a torch zip pickle of the payload, both named `name` (.safetensors)."""
    marker = tmp_path / "ran"
    legacy = tmp_path / "legacy" / name
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(pickle.dumps({"weight": _Payload(marker)}, protocol=2))
    zipped = tmp_path / "zip" / name
    zipped.parent.mkdir(parents=True)
    torch.save({"weight": _Payload(marker)}, zipped)
    assert zipped.read_bytes()[:4] == b"PK\x03\x04" and legacy.read_bytes()[:1] == b"\x80"
    return marker, [legacy, zipped]


def _refused(load, path, marker) -> None:
    with pytest.raises(MisnamedPickleError) as info:
        load(path)
    message = one_line(info)
    assert f"{path} is a PyTorch pickle named .safetensors" in message and "does not unpickle" in message
    assert not marker.exists()


def test_pickles_named_safetensors_are_never_loaded(pipe, folder, tmp_path):
    marker, files = _evil_files(tmp_path, "evil.safetensors")
    for path in files:
        _refused(read_checkpoint, path, marker)
        _refused(SafetensorsFile, path, marker)
        _refused(lambda p: sdjax.load_pipeline(p, config=folder), path, marker)
        _refused(pipe.load_lora, path, marker)
        _refused(pipe.load_textual_inversion, path, marker)
        _refused(lambda p: load_vae(p, pipe.vae.config), path, marker)


def test_pickles_named_safetensors_in_a_folder(pipe, copy, tmp_path):
    marker, files = _evil_files(tmp_path, "diffusion_pytorch_model.safetensors")
    for path in files:
        shutil.copyfile(path, copy / VAE_FILE)
        _refused(lambda _: sdjax.load_pipeline(copy), copy / VAE_FILE, marker)
        _refused(lambda _: load_vae(copy / "vae", pipe.vae.config), copy / VAE_FILE, marker)

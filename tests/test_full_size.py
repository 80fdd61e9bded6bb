"""The exact SD 1.5 and SD 2.1 architectures (shipped configs, random weights) against diffusers/transformers.

Slow and memory-hungry (README.md, "Tests"): run with `make test-slow` or `pytest -m slow -s`. Prints the
parity errors, the load time and the peak RSS of loading the UNet alone in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
from reference import DATA, SD15, SD21, build_text_encoder, build_unet, build_vae, nchw, nhwc, rel_l2, save_folder

import sdjax

pytestmark = pytest.mark.slow

_LOAD_UNET = """
import json, sys, time
from pathlib import Path
import jax.numpy as jnp
from sdjax.convert.diffusers_folder import UNET, load_component
start = time.perf_counter()
module, params = load_component(Path(sys.argv[1]), UNET, jnp.float32)
seconds = time.perf_counter() - start
nbytes = sum(x.nbytes for x in __import__("jax").tree.leaves(params))
# VmHWM, not ru_maxrss: the latter survives exec and would report the (large) forking test process.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
print(json.dumps({"seconds": seconds, "peak_rss": hwm, "param_bytes": nbytes}))
"""


def _config(model, component):
    return json.loads((model / component / "config.json").read_text())


@pytest.mark.parametrize("model", [SD15, SD21], ids=["sd15", "sd21"])
def test_full_size_parity(model, tmp_path):
    unet = build_unet(_config(model, "unet"))
    vae = build_vae(_config(model, "vae"))
    text = build_text_encoder(_config(model, "text_encoder"))
    folder = save_folder(tmp_path / model.name, unet, vae, text, tokenizer_from=model, scheduler_from=model)

    probe = subprocess.run([sys.executable, "-c", _LOAD_UNET, str(folder)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    unet_load = json.loads(probe.stdout)

    start = time.perf_counter()
    pipe = sdjax.load_pipeline(folder)
    load_seconds = time.perf_counter() - start

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49406, (2, 77))
    ids[:, 0], ids[:, 12:] = 49406, 49407
    ours_text = jax.jit(pipe.text_encoder.apply)({"params": pipe.params["text_encoder"]}, ids)
    with torch.no_grad():
        ref_text = text(torch.from_numpy(ids), output_hidden_states=True)
    errors = {
        "text last": rel_l2(ours_text[0], ref_text.last_hidden_state),
        "text penultimate": rel_l2(ours_text.hidden_states[-2], ref_text.hidden_states[-2]),
    }

    x = rng.standard_normal((2, 32, 32, 4)).astype(np.float32)
    t = np.array([999.0, 1.0], np.float32)
    ctx = ref_text.last_hidden_state.numpy()
    ours = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, x, t, ctx)
    with torch.no_grad():
        errors["unet"] = rel_l2(ours, nhwc(unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample))

    img = rng.uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    mean, _ = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method="encode"))(pipe.params["vae"], img)
    z = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    image = jax.jit(lambda p, z: pipe.vae.apply({"params": p}, z, method="decode"))(pipe.params["vae"], z)
    with torch.no_grad():
        errors["vae encode"] = rel_l2(mean, nhwc(vae.encode(nchw(img)).latent_dist.mean))
        errors["vae decode"] = rel_l2(image, nhwc(vae.decode(nchw(z)).sample))

    gib = 2**30
    print(
        f"\n{model.name}: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        + f"; load_pipeline {load_seconds:.1f} s; UNet alone: load {unet_load['seconds']:.1f} s, "
        f"peak RSS {unet_load['peak_rss'] / gib:.2f} GiB for {unet_load['param_bytes'] / gib:.2f} GiB of params"
    )
    assert max(errors.values()) <= 1e-5
    assert unet_load["peak_rss"] <= 2.0 * unet_load["param_bytes"]


SDXL_BASE, SDXL_REFINER = DATA / "stable-diffusion-xl-base-1.0", DATA / "stable-diffusion-xl-refiner-1.0"


def _torch_then_sdjax(component, torch_model, spec, run_torch, run_sdjax, tmp_path):
    """rel L2 of sdjax against torch for one component of a real architecture, holding one framework's
    weights at a time (the SDXL UNet is 10 GB in fp32): torch's output and file first, then sdjax's."""
    import gc

    import jax.numpy as jnp

    from sdjax.convert.diffusers_folder import load_component

    folder = tmp_path / "model"
    torch_model.save_pretrained(folder / component)
    with torch.no_grad():
        theirs = run_torch(torch_model)
    del torch_model
    gc.collect()
    module, params = load_component(folder, spec, jnp.float32)
    ours = run_sdjax(module, params)
    return rel_l2(ours, theirs)


@pytest.mark.parametrize("model", [SDXL_BASE, SDXL_REFINER], ids=["sdxl_base", "sdxl_refiner"])
def test_sdxl_unet_full_size_parity(model, tmp_path):
    """SDXL base's (2.6 B parameters) and the refiner's UNet against diffusers at 64x64 latents, with
    micro-conditioning (6 ids for the base, 5 with the aesthetic score for the refiner)."""
    from sdjax.convert.diffusers_folder import UNET

    config = _config(model, "unet")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 64, 4)).astype(np.float32)
    t = np.array([999.0, 261.0], np.float32)
    context = rng.standard_normal((2, 77, config["cross_attention_dim"])).astype(np.float32)
    n_ids = (config["projection_class_embeddings_input_dim"] - 1280) // config["addition_time_embed_dim"]
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024][:n_ids], [768, 1344, 32, 0, 1024, 1024][:n_ids]], np.float32)
    if n_ids == 5:
        time_ids[:, 4] = [6.0, 2.5]
    pooled = rng.standard_normal((2, 1280)).astype(np.float32)
    added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}
    err = _torch_then_sdjax(
        "unet",
        build_unet(config),
        UNET,
        lambda m: nhwc(m(nchw(x), torch.from_numpy(t), torch.from_numpy(context), added_cond_kwargs=added).sample),
        lambda module, p: jax.jit(module.apply)(
            {"params": p}, x, t, context, text_embeds_BD=pooled, time_ids_BN=time_ids
        ),
        tmp_path,
    )
    print(f"{model.name} UNet rel L2 {err:.2e}")
    assert err <= 1e-5


def test_sdxl_text_encoder_2_full_size_parity(tmp_path):
    """OpenCLIP bigG (CLIPTextModelWithProjection, 32 layers of 1280): the projected pooled embedding and
    the penultimate hidden states SDXL reads."""
    from reference import randomize_
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdjax.convert.diffusers_folder import TEXT_ENCODER_2

    config = {
        k: v for k, v in _config(SDXL_BASE, "text_encoder_2").items() if k not in ("architectures", "torch_dtype")
    }
    torch_model = randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**config)), 3)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 49406, (2, 77))
    ids[:, 0], ids[0, 9], ids[0, 10:], ids[1, 76] = 49406, 49407, 0, 49407  # "!"-padding (id 0), as tokenizer_2

    def torch_run(m):
        out = m(torch.from_numpy(ids), output_hidden_states=True)
        return np.concatenate([out.text_embeds.numpy().ravel(), out.hidden_states[-2].numpy().ravel()])

    def sdjax_run(module, p):
        out = jax.jit(module.apply)({"params": p}, ids)
        return np.concatenate([np.ravel(out.text_embeds), np.ravel(out.hidden_states[-2])])

    err = _torch_then_sdjax("text_encoder_2", torch_model, TEXT_ENCODER_2, torch_run, sdjax_run, tmp_path)
    print(f"text_encoder_2 rel L2 {err:.2e}")
    assert err <= 1e-5

"""python -m train on SDXL models: one step's loss and UNet gradients equal diffusers'
train_text_to_image_sdxl.py computation, the micro-conditioning of each row is the script's, and full
(slow) and LoRA runs export what diffusers' SDXL pipeline loads (the tiny SDXL of sdjax.testing, 64x64
images)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from reference import nchw, rel_l2
from test_train import make_squares, step_and_draws

import sdjax
from sdjax import testing
from sdjax.convert.diffusers_folder import UNET, keymap_for
from sdjax.convert.keymap import params_to_torch
from train import model
from train.__main__ import parse
from train.config import Images, Optim, TrainConfig
from train.data import image_time_ids
from train.loop import run


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return testing.random_pipeline("tiny-sdxl").save_pretrained(tmp_path_factory.mktemp("sdxl") / "tiny")


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return make_squares(tmp_path_factory.mktemp("squares"))  # four 80x72 images


def test_time_ids_follow_the_diffusers_script(tmp_path):
    """[original h, w, crop top, crop left, R, R]: the shorter side resized to R, the crop's corner in the
    resized image (center: rounded as the script), after a flip R - left (the script's convention)."""
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((60, 100, 3), np.uint8)).save(path)  # h 60, w 100 -> resized 53 x 32 at R = 32
    assert image_time_ids(path, 32, None, False).tolist() == [60, 100, 0, 10, 32, 32]  # round(10.5) = 10
    assert image_time_ids(path, 32, None, True).tolist() == [60, 100, 0, 22, 32, 32]
    assert image_time_ids(path, 32, (1.0, 0.0), False).tolist() == [60, 100, 0, 21, 32, 32]


def test_loss_and_gradients_match_diffusers_train_text_to_image_sdxl(tiny_sdxl, tmp_path):
    """One full fine-tuning step (random weights everywhere) against the script's computation, given the same
    images, captions, time ids, posterior noise, noise and timesteps:
      model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
      noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
      prompt_embeds, pooled = encode_prompt(...)  (penultimate states of both encoders, side by side; the
                                                   second's text_embeds)
      model_pred = unet(noisy_model_input, timesteps, prompt_embeds,
                        added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled}).sample
      loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    Loss <= 1e-5 relative, every UNet gradient <= 1e-4 relative L2."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = TrainConfig(model=str(tiny_sdxl), mode="full", images=Images(resolution=64), optim=Optim(batch_size=2))
    setup = model.make_setup(config, model.load_start(config))
    trainable, frozen = model.split_params(setup, jax.random.key(0))
    rng = np.random.default_rng(0)
    captions = ["a red square", "a blue circle on grass"]
    batch = {
        "pixels": rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32),
        "ids": setup.pipe.tokenizer(captions),
        "ids_2": setup.pipe.tokenizer_2(captions),
        "time_ids": np.array([[72, 80, 0, 8, 64, 64], [512, 384, 32, 0, 64, 64]], np.float32),
        "row": np.array([0, 2], np.int32),
        "weight": np.ones(2, np.float32),
        "count": np.ones(2, np.float32),
    }
    loss, grads, eps_posterior, noise, steps = step_and_draws(setup, trainable, frozen, batch, jax.random.key(5))

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    vae = AutoencoderKL.from_pretrained(tiny_sdxl / "vae").eval()
    text = CLIPTextModel.from_pretrained(tiny_sdxl / "text_encoder").eval()
    text_2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl / "text_encoder_2").eval()
    scheduler = DDPMScheduler.from_pretrained(tiny_sdxl / "scheduler")
    with torch.no_grad():
        dist = vae.encode(nchw(batch["pixels"])).latent_dist
        z = (dist.mean + dist.std * nchw(eps_posterior)) * vae.config.scaling_factor
        first = text(torch.from_numpy(np.asarray(batch["ids"], np.int64)), output_hidden_states=True)
        second = text_2(torch.from_numpy(np.asarray(batch["ids_2"], np.int64)), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    timesteps = torch.from_numpy(steps.astype(np.int64))
    noisy = scheduler.add_noise(z, nchw(noise), timesteps)
    added = {"time_ids": torch.from_numpy(batch["time_ids"]), "text_embeds": second.text_embeds}
    pred = unet(noisy, timesteps, context, added_cond_kwargs=added).sample
    torch_loss = torch.nn.functional.mse_loss(pred.float(), nchw(noise).float(), reduction="mean")
    torch_loss.backward()

    print(f"loss: sdjax {float(loss):.7f}, diffusers {torch_loss.item():.7f}")
    assert abs(float(loss) - torch_loss.item()) <= 1e-5 * abs(torch_loss.item())
    ours = params_to_torch(grads["unet"], keymap_for(UNET, setup.pipe.unet))
    theirs = {name: p.grad.numpy() for name, p in unet.named_parameters()}
    assert ours.keys() == theirs.keys()
    errors = {k: rel_l2(ours[k], theirs[k]) for k in theirs}
    worst = max(errors, key=errors.get)
    print(f"{len(errors)} UNet gradients, worst relative L2 {errors[worst]:.2e} ({worst})")
    assert np.abs(theirs["add_embedding.linear_1.weight"]).max() > 0  # the time ids reach the loss
    assert errors[worst] <= 1e-4


def _args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(base), "--data", str(data), "--output", str(out), "--resolution", "64",
        "--batch-size", "2", "--learning-rate", "1e-3", "--steps", "2", "--progress", "false",
        "--random-flip", "true", *extra,
    ]  # fmt: skip


@pytest.mark.slow  # the default run: the LoRA run's SDXL export below, and SD 1.5's full export (test_train.py)
def test_full_run_exports_an_sdxl_folder_diffusers_loads(tiny_sdxl, squares, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "full"  # with the captions encoded once, as configs/sdxl_full.py (the encoders still export)
    run(parse(_args(tiny_sdxl, squares, out, "--mode", "full", "--cache-text-embeddings", "true")))
    final = out / "final"
    index = json.loads((final / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    trained = sdjax.load_pipeline(final)
    before = sdjax.load_pipeline(tiny_sdxl)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(trained.params["unet"]), jax.tree.leaves(before.params["unet"]), strict=True)
    ]
    assert any(changed)
    for part in ("vae", "text_encoder", "text_encoder_2"):  # frozen
        for a, b in zip(jax.tree.leaves(trained.params[part]), jax.tree.leaves(before.params[part]), strict=True):
            assert np.array_equal(a, b), part
    pipe = StableDiffusionXLPipeline.from_pretrained(final, add_watermarker=False)
    assert pipe.unet.config.addition_embed_type == "text_time"


def test_lora_run_with_text_encoders_exports_files_diffusers_applies_as_sdjax(tiny_sdxl, squares, tmp_path):
    """LoRA on the UNet and both text encoders: the exported PEFT file, loaded by diffusers'
    load_lora_weights + fuse_lora, and the kohya file (SGM names, lora_te1_/lora_te2_) loaded by sdjax give
    sdjax's merged UNet output and text states."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "lora"
    run(parse(_args(tiny_sdxl, squares, out, "--mode", "lora", "--lora-text-encoder", "true", "--lora-rank", "4")))
    final = out / "final"
    peft, kohya = final / "pytorch_lora_weights.safetensors", final / "pytorch_lora_weights_kohya.safetensors"
    from safetensors.numpy import load_file

    names = list(load_file(str(kohya)))
    assert any(n.startswith("lora_te2_") for n in names) and any(n.startswith("lora_unet_input_blocks_") for n in names)
    base = sdjax.load_pipeline(tiny_sdxl)
    ours, from_kohya = base.load_lora(peft), base.load_lora(kohya)
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(from_kohya.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    theirs = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    theirs.load_lora_weights(str(peft))
    theirs.fuse_lora()
    ids = np.array(base.tokenizer_2(["a red square"]))
    for part in ("text_encoder", "text_encoder_2"):
        mine = getattr(ours, part).apply({"params": ours.params[part]}, ids).hidden_states[-2]
        with torch.no_grad():
            other = getattr(theirs, part)(torch.from_numpy(ids), output_hidden_states=True).hidden_states[-2]
        base_states = getattr(base, part).apply({"params": base.params[part]}, ids).hidden_states[-2]
        assert rel_l2(base_states, other) > 1e-4, part  # trained: the LoRA changed the encoder
        assert rel_l2(mine, other) <= 1e-5, part
    mine = params_to_torch(ours.params["unet"], keymap_for(UNET, ours.unet))
    theirs_state = {k.replace(".base_layer", ""): v for k, v in theirs.unet.state_dict().items() if "lora_" not in k}
    worst = max(rel_l2(mine[k], theirs_state[k].numpy()) for k in mine)
    assert worst <= 1e-5


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--mode", "textual_inversion", "--instance-prompt", "a <concept>"), "not supported for SDXL models yet"),
        (("--mode", "full", "--train-text-encoder", "true"), "through LoRA with --mode lora --lora-text-encoder true"),
    ],
)
def test_unsupported_sdxl_runs_are_one_line(tiny_sdxl, squares, tmp_path, extra, message):
    with pytest.raises(model.SetupError, match=message):
        run(parse(_args(tiny_sdxl, squares, tmp_path / "out", *extra)))
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.slow  # SDXL DreamBooth LoRA end to end; the default run: DreamBooth's step (test_train_parity.py)
def test_dreambooth_lora_draws_its_class_images_and_exports(tiny_sdxl, squares, tmp_path):
    """DreamBooth on SDXL (as diffusers' train_dreambooth_lora_sdxl.py: LoRA, prior preservation): the class
    images are drawn by the SDXL pipeline itself, their rows carry their own time ids, and the LoRA it
    exports changes sdjax's image."""
    out = tmp_path / "db"
    extra = (
        "--mode", "dreambooth", "--lora", "true", "--steps", "3", "--instance-prompt", "a photo of sks square",
        "--class-prompt", "a photo of a square", "--num-class-images", "2", "--class-sample-steps", "2",
    )  # fmt: skip
    run(parse(_args(tiny_sdxl, squares, out, *extra)))
    assert len(list((out / "class_images").glob("*.png"))) == 2
    base = sdjax.load_pipeline(tiny_sdxl)
    kwargs = dict(num_inference_steps=2, seed=3)
    before = base.generate("a photo of sks square", **kwargs)
    after = base.load_lora(out / "final" / "pytorch_lora_weights.safetensors").generate(
        "a photo of sks square", **kwargs
    )
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 0.5

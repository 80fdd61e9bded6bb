"""python -m train --mode controlnet: one step's loss and gradients equal diffusers' train_controlnet.py
computation, the export is a ControlNet folder diffusers loads with the same residuals, a resumed run and an
8-device run give the one-process numbers, bad data is one line, and a small ControlNet trained on squares
draws its square where the condition image puts it."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from reference import nchw, rel_l2
from test_controlnet import _residuals_sdjax, _residuals_torch
from test_train import MICRO, cli, finish, losses, step_and_draws, weights

import sdjax
from sdjax import testing
from sdjax.convert.diffusers_folder import CONTROLNET, keymap_for
from sdjax.convert.keymap import params_to_torch
from sdjax.pipeline import DEMO_MODEL
from train import model
from train.__main__ import parse
from train.config import ControlNetTraining, Images, Optim, TrainConfig
from train.data import DataError
from train.loop import run

SIDE = 20  # the squares' side at 64x64 (5/16 of the image)


def make_squares(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` size x size images of a red square (side 5/16 of the image) at a random place on grey, each
    with its condition image (the square in white on black), captioned "a red square"."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    side = size * SIDE // 64
    lines = []
    for i in range(count):
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        image = np.full((size, size, 3), 96, np.uint8)
        image[y : y + side, x : x + side] = (220, 40, 40)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
        Image.fromarray(square_condition(x, y, size, side)).save(folder / f"{i:04d}_cond.png")
        record = {"file_name": f"{i:04d}.png", "conditioning_image": f"{i:04d}_cond.png", "text": "a red square"}
        lines.append(json.dumps(record))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def square_condition(x: int, y: int, size: int, side: int) -> np.ndarray:
    condition = np.zeros((size, size, 3), np.uint8)
    condition[y : y + side, x : x + side] = 255
    return condition


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The MICRO model of test_train (8x8 latents of 16x16 images: the VAE downscales 2x) as a folder."""
    return testing.random_pipeline(MICRO).save_pretrained(tmp_path_factory.mktemp("cn") / "micro")


@pytest.fixture(scope="module")
def squares16(tmp_path_factory):
    return make_squares(tmp_path_factory.mktemp("squares16"), 8, 16)


def micro_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--mode", "controlnet", "--model", str(base), "--data", str(data), "--output", str(out),
        "--resolution", "16", "--batch-size", "2", "--learning-rate", "1e-3", "--steps", "4",
        "--controlnet-embedding-channels", "8,16", "--progress", "false", "--checkpoint-every", "2",
        *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the step


def test_loss_and_gradients_match_diffusers_train_controlnet(micro, squares16, tmp_path):
    """One training step of a ControlNet in mid-training (random weights everywhere, so every parameter
    gets a gradient) against the computation of diffusers' examples/controlnet/train_controlnet.py, given
    the same images, captions, condition images, posterior noise, noise and timesteps:
      latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
      noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
      encoder_hidden_states = text_encoder(input_ids)[0]
      down, mid = controlnet(noisy_latents, timesteps, encoder_hidden_states, controlnet_cond=controlnet_image)
      model_pred = unet(noisy_latents, timesteps, encoder_hidden_states,
                        down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
      loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")   (target = noise: epsilon)
    Loss <= 1e-5 relative, every ControlNet parameter's gradient <= 1e-4 relative L2."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    config = TrainConfig(
        model=str(micro),
        mode="controlnet",
        images=Images(resolution=16),
        optim=Optim(batch_size=2),
        controlnet=ControlNetTraining(embedding_channels=(8, 16)),
    )
    setup = model.make_setup(config, model.load_start(config))
    trainable, frozen = model.split_params(setup, jax.random.key(0))
    trainable = {"controlnet": jax.tree.map(jnp.asarray, testing.random_like(trainable["controlnet"], 11))}
    rng = np.random.default_rng(0)
    batch = {
        "pixels": rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
        "ids": setup.pipe.tokenizer(["a red square", "a blue circle on grass"]),
        "control": rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32),
        "row": np.array([0, 2], np.int32),
        "weight": np.ones(2, np.float32),
        "count": np.ones(2, np.float32),
    }
    key = jax.random.key(5)
    loss, grads, eps_posterior, noise, steps = step_and_draws(setup, trainable, frozen, batch, key)
    assert steps[0] != steps[1]

    cn_folder = sdjax.ControlNet(setup.controlnet_start.module, trainable["controlnet"]).save_pretrained(
        tmp_path / "cn"
    )
    torch_cn = ControlNetModel.from_pretrained(cn_folder)
    unet = UNet2DConditionModel.from_pretrained(micro / "unet").eval()
    torch_vae = AutoencoderKL.from_pretrained(micro / "vae").eval()
    text = CLIPTextModel.from_pretrained(micro / "text_encoder").eval()
    scheduler = DDPMScheduler.from_pretrained(micro / "scheduler")
    with torch.no_grad():
        dist = torch_vae.encode(nchw(batch["pixels"])).latent_dist
        z = (dist.mean + dist.std * nchw(eps_posterior)) * torch_vae.config.scaling_factor
        ctx = text(torch.from_numpy(np.asarray(batch["ids"], np.int64)))[0]
    timesteps = torch.from_numpy(steps.astype(np.int64))
    noisy = scheduler.add_noise(z, nchw(noise), timesteps)
    down, mid = torch_cn(noisy, timesteps, ctx, controlnet_cond=nchw(batch["control"]), return_dict=False)
    pred = unet(noisy, timesteps, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    torch_loss = torch.nn.functional.mse_loss(pred.float(), nchw(noise).float(), reduction="mean")
    torch_loss.backward()

    print(f"loss: sdjax {float(loss):.7f}, diffusers {torch_loss.item():.7f}")
    assert abs(float(loss) - torch_loss.item()) <= 1e-5 * abs(torch_loss.item())
    ours_torch = params_to_torch(grads["controlnet"], keymap_for(CONTROLNET, setup.controlnet_start.module))
    theirs = {name: p.grad.numpy() for name, p in torch_cn.named_parameters()}
    assert ours_torch.keys() == theirs.keys()
    errors = {k: rel_l2(ours_torch[k], theirs[k]) for k in theirs}
    worst = max(errors, key=errors.get)
    print(f"{len(errors)} gradients, worst relative L2 {errors[worst]:.2e} ({worst})")
    assert all(np.abs(theirs[k]).max() > 0 for k in theirs)
    assert errors[worst] <= 1e-4


# ---------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def micro_run(micro, squares16, tmp_path_factory):
    out = tmp_path_factory.mktemp("micro_run") / "run"
    run(parse(micro_args(micro, squares16, out, "--sample-prompts", "a red square", "--sample-steps", "2")))
    return out


def test_export_is_a_controlnet_folder_diffusers_loads_with_the_same_residuals(micro_run, micro):
    """final/ is a diffusers ControlNet folder: diffusers' ControlNetModel and sdjax.load_controlnet load it
    and give the same residuals; training moved its zero-initialised output convolutions; the samples were
    drawn with the first training image's condition."""
    from diffusers import ControlNetModel

    final = micro_run / "final"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    torch_cn = ControlNetModel.from_pretrained(final).eval()
    cn = sdjax.load_controlnet(final)
    assert cn.config.conditioning_embedding_out_channels == (8, 16)
    rng = np.random.default_rng(1)
    inputs = (
        rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
        np.array([10.0, 700.0], np.float32),
        rng.standard_normal((2, 77, 32)).astype(np.float32),
        rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32),
    )
    want_down, want_mid = _residuals_torch(torch_cn, inputs)
    got_down, got_mid = _residuals_sdjax(cn, inputs)
    worst = max(rel_l2(g, w) for g, w in zip([*got_down, got_mid], [*want_down, want_mid], strict=True))
    print(f"residuals of the trained ControlNet, worst relative L2 against diffusers: {worst:.2e}")
    assert worst <= 1e-5
    assert np.abs(want_mid).max() > 0  # no longer the zero start
    # the UNet's copy: the ControlNet's encoder started as the UNet's and changed by training
    unet = weights(micro / "unet/diffusion_pytorch_model.safetensors")
    trained = weights(final / "diffusion_pytorch_model.safetensors")
    assert 0 < rel_l2(trained["down_blocks.0.resnets.0.conv1.weight"], unet["down_blocks.0.resnets.0.conv1.weight"])
    assert (micro_run / "samples" / "step-000004-0.png").is_file()


@pytest.mark.slow  # the default run checks resuming and 8 devices without a ControlNet (test_train.py)
def test_a_resumed_run_and_eight_devices_give_the_one_process_numbers(micro, squares16, micro_run, tmp_path):
    """Stopped after 2 of 4 steps and run again: the same losses and weights bit for bit. On 8 devices
    (data=2, fsdp=4): the same losses and weights to 1e-5."""
    resumed = tmp_path / "resumed"
    run(parse(micro_args(micro, squares16, resumed, "--steps", "2", "--sample-prompts", "")))
    run(parse(micro_args(micro, squares16, resumed, "--sample-prompts", "")))
    np.testing.assert_array_equal(losses(resumed), losses(micro_run))
    mine = weights(micro_run / "final/diffusion_pytorch_model.safetensors")
    again = weights(resumed / "final/diffusion_pytorch_model.safetensors")
    assert all(np.array_equal(mine[k], again[k]) for k in mine)

    eight = tmp_path / "eight"
    finish(cli(*micro_args(micro, squares16, eight, "--mesh", "data=2,fsdp=4", "--sample-prompts", ""), devices=8))
    np.testing.assert_allclose(losses(eight), losses(micro_run), rtol=1e-5)
    theirs = weights(eight / "final/diffusion_pytorch_model.safetensors")
    worst = max(rel_l2(theirs[k], mine[k]) for k in mine)
    print(f"8 devices against 1: losses {losses(eight)} vs {losses(micro_run)}, worst parameter {worst:.2e}")
    assert worst <= 1e-5


def test_bad_controlnet_runs_are_one_line(micro, squares16, tmp_path):
    """Data without condition images, a missing condition file, a ControlNet of another model, a condition
    embedding that does not fit the VAE, and samples without as many condition images as prompts."""
    out = tmp_path / "out"

    def refused(data, *extra):
        with pytest.raises(ValueError) as info:
            run(parse(micro_args(micro, data, out, *extra)))
        message = str(info.value)
        assert "\n" not in message
        assert not out.exists() or not any(out.iterdir())  # nothing written
        return message

    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (16, 16)).save(plain / "a.png")
    (plain / "a.txt").write_text("a square")
    assert "no metadata.jsonl" in refused(plain) and '"conditioning_image"' in refused(plain)

    no_column = tmp_path / "no_column"
    no_column.mkdir()
    Image.new("RGB", (16, 16)).save(no_column / "a.png")
    (no_column / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a square"}) + "\n")
    assert 'no condition image ("conditioning_image")' in refused(no_column)
    assert "no condition image" in refused(no_column, "--controlnet-conditioning-column", "edges")

    missing = tmp_path / "missing"
    missing.mkdir()
    Image.new("RGB", (16, 16)).save(missing / "a.png")
    record = {"file_name": "a.png", "conditioning_image": "gone.png", "text": "a square"}
    (missing / "metadata.jsonl").write_text(json.dumps(record) + "\n")
    assert "condition image" in refused(missing) and "gone.png does not exist" in refused(missing)

    # HF imagefolder's name for the column is read too
    imagefolder = tmp_path / "imagefolder"
    imagefolder.mkdir()
    Image.new("RGB", (16, 16)).save(imagefolder / "a.png")
    Image.new("RGB", (16, 16)).save(imagefolder / "a_cond.png")
    record = {"file_name": "a.png", "conditioning_image_file_name": "a_cond.png", "text": "a square"}
    (imagefolder / "metadata.jsonl").write_text(json.dumps(record) + "\n")
    from train.data import scan_folder

    assert scan_folder(imagefolder, condition_column="conditioning_image")[0].condition == imagefolder / "a_cond.png"
    with pytest.raises(DataError):
        scan_folder(no_column, condition_column="conditioning_image")

    assert "VAE's factor is 2" in refused(squares16, "--controlnet-embedding-channels", "16,32,96,256")
    other = testing.random_pipeline("tiny")
    foreign = sdjax.ControlNet.from_unet(other).save_pretrained(tmp_path / "foreign")
    message = refused(squares16, "--controlnet-model", str(foreign))
    assert message.startswith("--controlnet-model: ControlNet 0 has blocks [32, 64]") and "[32]" in message
    message = refused(squares16, "--sample-prompts", "a,b,c", "--controlnet-sample-images", "x.png,y.png")
    assert "2 controlnet_sample_images for 3 sample_prompts" in message
    assert "does not exist" in refused(squares16, "--sample-prompts", "a", "--controlnet-sample-images", "x.png")
    assert "drop --train-text-encoder" in refused(squares16, "--train-text-encoder", "true")


# ---------------------------------------------------------------------------------------------- it learns


def red_centre(image) -> np.ndarray | None:
    """(x, y) of the red pixels' weighted centre, or None when nothing is red."""
    a = np.asarray(image, np.float32)
    redness = np.clip(a[..., 0] - 0.5 * (a[..., 1] + a[..., 2]) - 60.0, 0.0, None)
    if redness.sum() < 1.0:
        return None
    ys, xs = np.mgrid[: a.shape[0], : a.shape[1]]
    return np.array([(redness * xs).sum(), (redness * ys).sum()]) / redness.sum()


@pytest.mark.slow  # 2.5 min alone, 6 beside another test file: long training (see the README)
def test_a_trained_controlnet_puts_the_square_where_the_condition_says(tmp_path):
    """The workflow end to end on the bundled demo model (64x64 images, a trained VAE): a full fine-tune
    teaches its UNet red squares at random places (150 steps), then a ControlNet made from that UNet learns
    from the squares' masks where to draw them (150 steps, the UNet frozen). On 16 new positions, the red
    square the ControlNet draws sits within a few pixels of its condition; without the ControlNet (scale 0)
    the same prompt and seeds put it anywhere."""
    data = make_squares(tmp_path / "squares", 128, 64)
    common = ["--resolution", "64", "--batch-size", "8", "--learning-rate", "5e-4", "--steps", "150",
              "--progress", "false", "--checkpoint-every", "1000", "--sample-prompts", ""]  # fmt: skip
    base = run(parse(["--model", str(DEMO_MODEL), "--data", str(data), "--output", str(tmp_path / "unet"),
                      *common]))  # fmt: skip
    final = run(parse(["--mode", "controlnet", "--model", str(base), "--data", str(data), "--output",
                       str(tmp_path / "cn"), "--controlnet-embedding-channels", "16,32,96", *common]))  # fmt: skip

    pipe, cn = sdjax.load_pipeline(base), sdjax.load_controlnet(final)
    rng = np.random.default_rng(123)
    places = rng.integers(0, 64 - SIDE + 1, (16, 2))
    conditions = [Image.fromarray(square_condition(int(x), int(y), 64, SIDE)) for x, y in places]
    errors = {}
    for scale in (1.0, 0.0):
        images = pipe.generate(
            ["a red square"] * len(places), controlnet=cn, control_image=conditions, seed=7,
            num_inference_steps=20, height=64, width=64, controlnet_conditioning_scale=scale,
        )  # fmt: skip
        centres = [red_centre(image) for image in images]
        found = [c for c in centres if c is not None]
        distance = [np.linalg.norm(c - (p + SIDE / 2)) for c, p in zip(centres, places, strict=True) if c is not None]
        errors[scale] = float(np.mean(distance)) if distance else float("inf")
        median = np.median(distance) if distance else float("nan")
        print(
            f"scale {scale}: {len(found)}/{len(places)} images with red, mean distance to the condition's "
            f"square {errors[scale]:.1f} px (median {median:.1f})"
        )
        if scale == 1.0:
            assert len(found) == len(places)
    # the squares' centres lie within [10, 54]^2: a centre placed independently of the condition is ~20 px off
    assert errors[1.0] <= 8.0
    assert errors[0.0] >= 2.5 * errors[1.0]


def test_condition_images_are_cropped_and_flipped_with_their_images(micro, tmp_path):
    """With random crops and flips (and with cached latents), every row's condition image is cut and
    mirrored exactly as its training image: here each condition is a copy of its image, so the two agree
    pixel for pixel (the condition in [0, 1], the image in [-1, 1])."""
    from train.data import Batches, scan_folder

    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    lines = []
    for i in range(4):
        pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # wider than tall: crops differ
        Image.fromarray(pixels).save(folder / f"{i}.png")
        Image.fromarray(pixels).save(folder / f"{i}_c.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "conditioning_image": f"{i}_c.png", "text": "noise"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    examples = scan_folder(folder, condition_column="conditioning_image")
    for center_crop, cache in ((False, False), (True, True)):
        config = TrainConfig(
            model=str(micro),
            mode="controlnet",
            images=Images(resolution=16, center_crop=center_crop, random_flip=True, cache_latents=cache),
            optim=Optim(batch_size=4),
            controlnet=ControlNetTraining(embedding_channels=(8, 16)),
        )
        setup = model.make_setup(config, model.load_start(config))
        latents = None
        if cache:
            from train.data import encode_latent_cache

            latents = encode_latent_cache(setup, examples)
        batches = Batches(setup, examples, [], 1, latents)
        controls = []
        for step in range(4):
            rows = batches.micro(step, 0)
            assert rows["control"].shape == (4, 16, 16, 3)
            controls += [c.tobytes() for c in rows["control"]]
            if cache:
                assert "moments" in rows and "pixels" not in rows
            else:
                np.testing.assert_allclose(rows["control"] * 2.0 - 1.0, rows["pixels"], atol=1e-6)
        # 16 rows of 4 images: random crops and flips give more than 4 different conditions, center crops
        # with flips at most 8
        assert len(set(controls)) > 8 if not center_crop else 4 <= len(set(controls)) <= 8

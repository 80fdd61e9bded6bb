"""Deviceless reports for accelerator targets: sdjax's programs compiled for a TPU topology on this host.

    python -m sdjax.bench --target tpu:v5e:2x2 --arch sd15 --height 512 --width 512 --dtype bfloat16 \
        --steps 50 --batch 1,2,4 --json tpu.json

libtpu (`pip install -e '.[tpu-aot]'`) runs the real TPU compiler on the CPU over abstract chips
(`jax.experimental.topologies`); no weights are read (the parameters are shapes). For each per-chip batch
it compiles the UNet CFG step, the VAE decode of one image and the whole-image program (text encoding,
every sampler step, the decode) on one chip and reads the compiler's cost analysis (FLOPs, bytes, its own
time estimate: `sdjax.targets.cost_model_seconds`, none around loops) and memory analysis (arguments,
outputs, temporaries per chip). A program's time is the cost model's where it gives one, at least its
roofline max(FLOPs / peak, bytes / bandwidth) (`sdjax.targets`); an image batch takes model calls x UNet
step + batch x one image's decode (the program decodes image by image). Images/s per chip and per slice
(chips x per chip: the images are independent) follow, and "fits" compares the whole-image program's
memory with the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sdjax.targets import CHIPS, analyse, on_device, parse_target, topology_devices

PROMPT = "a photo of an astronaut riding a horse on mars"


def report(pipe, *, target: str, batches, height: int, width: int, steps: int, scheduler: str, controlnet=None) -> dict:
    """The deviceless report of `pipe` (parameters may be shapes) for each per-chip batch; with `controlnet`
    (a sdjax.ControlNet, parameters may be shapes) the images are drawn with it and the ControlNet + UNet
    step is compiled and priced beside the plain one."""
    import numpy as np

    from sdjax.bench.workers import controlled_unet_step
    from sdjax.generate import modules, place_inputs, program
    from sdjax.request import prepare

    generation, topology = parse_target(target)
    chip = CHIPS[generation]
    devices = topology_devices(generation, topology)
    device = devices[0]
    params = on_device(device, pipe.params)
    factor = pipe.vae_scale_factor
    latent = (height // factor, width // factor)
    rows = []
    for batch in batches:
        row = {"batch": batch}
        x = jax.ShapeDtypeStruct((2 * batch, *latent, pipe.unet.config.in_channels), pipe.dtype)
        t = jax.ShapeDtypeStruct((2 * batch,), jnp.float32)
        context = jax.ShapeDtypeStruct((2 * batch, 77, pipe.unet.config.context_dims()[0]), pipe.dtype)
        added = {}
        if pipe.is_sdxl:  # the pooled text embedding and the time ids
            pooled = pipe.text_encoder_2.config.projection_dim
            n_ids = (
                pipe.unet.config.projection_class_embeddings_input_dim - pooled
            ) // pipe.unet.config.addition_time_embed_dim
            added = {
                "text_embeds_BD": jax.ShapeDtypeStruct((2 * batch, pooled), pipe.dtype),
                "time_ids_BN": jax.ShapeDtypeStruct((2 * batch, n_ids), jnp.float32),
            }
        unet = jax.jit(lambda p, x, t, c, a: pipe.unet.apply({"params": p}, x, t, c, **a))
        row["unet_step"] = analyse(unet.lower(params["unet"], *on_device(device, (x, t, context, added))), chip)
        step = row["unet_step"]
        control = {}
        if controlnet is not None:
            cond = jax.ShapeDtypeStruct((2 * batch, height, width, 3), jnp.float32)
            controlled = jax.jit(functools.partial(controlled_unet_step, pipe.unet, controlnet.module))
            control_params = on_device(device, controlnet.params)
            lowered = controlled.lower(params["unet"], control_params, *on_device(device, (x, t, context, cond)))
            step = row["control_step"] = analyse(lowered, chip)
            row["control_cost"] = step["time_s"] / row["unet_step"]["time_s"]
            edges = np.zeros((height, width, 3), np.uint8)
            control = {"controlnet": controlnet, "control_image": edges}
        # the whole-image program decodes its images one at a time (sdjax.generate), so one image is priced
        z = jax.ShapeDtypeStruct((1, *latent, pipe.vae.config.latent_channels), pipe.dtype)
        decode = jax.jit(lambda p, z: pipe.vae.apply({"params": p}, z, method="decode"))
        row["vae_decode"] = analyse(decode.lower(params["vae"], on_device(device, z)), chip)
        row["decode_s"] = batch * row["vae_decode"]["time_s"]
        plan, inputs = prepare(
            pipe,
            [PROMPT] * batch,
            num_inference_steps=steps,
            max_steps=steps,
            height=height,
            width=width,
            scheduler=scheduler,
            micro_batch_size=batch,
            mesh=None,
            **control,
        )
        static = dict(plan=plan, **modules(pipe))
        placed = on_device(device, place_inputs(dataclasses.replace(inputs, control_params=None), None))
        if controlnet is not None:
            placed = dataclasses.replace(placed, control_params=(control_params,))
        image = program("tpu").lower(params, placed, **static)
        row["image"] = analyse(image, chip)
        calls = plan.scheduler.num_model_calls(steps)
        seconds = calls * step["time_s"] + row["decode_s"]
        row["image_batch_s"] = seconds
        row["images_per_s_chip"] = batch / seconds
        row["images_per_s_slice"] = batch * len(devices) / seconds
        row["fits"] = row["image"]["total_bytes"] <= chip.hbm_bytes
        rows.append(row)
    return {
        "target": target,
        "chips": len(devices),
        "chip": dataclasses.asdict(chip),
        "height": height,
        "width": width,
        "steps": steps,
        "scheduler": scheduler,
        "dtype": str(pipe.dtype),
        "controlnet": controlnet is not None,
        "rows": rows,
        "largest_fitting_batch": max((r["batch"] for r in rows if r["fits"]), default=0),
    }


def table(result: dict) -> str:
    """The report as a text table, one line per per-chip batch."""
    control = ", with a ControlNet (step = ControlNet + UNet)" if result.get("controlnet") else ""
    head = (
        f"{result['target']} ({result['chips']} chips), {result['width']}x{result['height']}, {result['dtype']}, "
        f"{result['steps']} steps ({result['scheduler']}){control}; per chip:"
    )
    lines = [
        head,
        "batch | UNet step ms (est / roofline) | TFLOP | GB moved | decode ms | image batch s | images/s chip | "
        "images/s slice | memory GiB (temp) | fits | compile s (step, image)",
    ]
    for r in result["rows"]:
        u, i = r.get("control_step", r["unet_step"]), r["image"]
        est = f"{u['optimal_seconds'] * 1e3:.2f}" if u["optimal_seconds"] > 0 else "-"
        lines.append(
            f"{r['batch']:5d} | {est} / {u['roofline_s'] * 1e3:.2f} | {u['flops'] / 1e12:.2f} | "
            f"{u['bytes_accessed'] / 1e9:.2f} | {r['decode_s'] * 1e3:.1f} | {r['image_batch_s']:.2f} | "
            f"{r['images_per_s_chip']:.2f} | {r['images_per_s_slice']:.1f} | {i['total_bytes'] / 2**30:.2f} "
            f"({i['temp_bytes'] / 2**30:.2f}) | {'yes' if r['fits'] else 'NO'} | "
            f"{u['compile_s']:.0f}, {i['compile_s']:.0f}"
        )
    for r in result["rows"]:
        if "control_cost" in r:
            plain = r["unet_step"]
            lines.append(
                f"batch {r['batch']}: ControlNet + UNet step / UNet step = {r['control_cost']:.2f} "
                f"({r['control_step']['time_s'] * 1e3:.2f} / {plain['time_s'] * 1e3:.2f} ms)"
            )
    lines.append(f"largest per-chip batch that fits: {result['largest_fitting_batch']} of those tried")
    return "\n".join(lines)

"""ControlNet training on SD 1.5 (diffusers' train_controlnet.py settings: a new ControlNet from the UNet,
lr 1e-5, batch 4, 512x512), the UNet, VAE and text encoder frozen. The data folder's metadata.jsonl names
each image's condition image: {"file_name": "0.png", "conditioning_image": "0_edges.png", "text": "..."}.
The result, OUTPUT/final/, is a diffusers ControlNet folder: `sample.py --controlnet OUTPUT/final`,
`sdjax.load_controlnet` and diffusers' `ControlNetModel.from_pretrained` load it.

    python -m train --config configs/sd15_controlnet.py --model path/to/sd-v1-5 --data DIR --output runs/cn
    python -m train --config configs/sd15_controlnet.py:tiny --data DIR --output runs/tiny
"""

from train.config import Images, Optim, Outputs, TrainConfig, variant_of


def get_config(variant: str | None = None) -> TrainConfig:
    config = TrainConfig(
        mode="controlnet",
        dtype="bfloat16",
        remat="dots",
        optim=Optim(steps=20000, batch_size=4, grad_accum=1, learning_rate=1e-5, max_grad_norm=1.0),
        images=Images(resolution=512, caption_dropout=0.0),
        outputs=Outputs(checkpoint_every=500, sample_every=1000, sample_prompts=("a photo",)),
    )
    return variant_of(config, variant, "sd15_controlnet", learning_rate=1e-3)

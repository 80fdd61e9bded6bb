"""Full UNet fine-tune of SD 1.5 (diffusers' train_text_to_image.py settings: lr 1e-5, batch 1 x 4
accumulation, EMA), in bf16 compute with float32 master weights and gradient checkpointing.

    python -m train --config configs/sd15_full.py --model path/to/stable-diffusion-v1-5 --data DIR --output runs/full
    python -m train --config configs/sd15_full.py:tiny --data DIR --output runs/tiny   # random tiny model, seconds
"""

from train.config import Images, Optim, Outputs, TrainConfig, variant_of


def get_config(variant: str | None = None) -> TrainConfig:
    config = TrainConfig(
        mode="full",
        dtype="bfloat16",
        remat="full",
        optim=Optim(
            steps=15000,
            batch_size=1,
            grad_accum=4,
            learning_rate=1e-5,
            lr_schedule="constant",
            max_grad_norm=1.0,
            ema_decay=0.9999,
        ),
        images=Images(resolution=512, center_crop=True, random_flip=True),
        outputs=Outputs(checkpoint_every=500, sample_every=1000, sample_prompts=("a photo of a cat",)),
    )
    return variant_of(config, variant, "sd15_full", learning_rate=1e-3, ema_decay=0.99)

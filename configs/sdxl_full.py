"""Full UNet fine-tune of SDXL base (diffusers' train_text_to_image_sdxl.py settings: 1024x1024, lr 1e-6,
batch 1 x 4 accumulation, center crops and flips, micro-conditioning from each image's size and crop), in
bf16 compute with float32 master weights and gradient checkpointing; the text encoders stay frozen and, as
in the script, every caption is encoded once before training (cache_text_embeddings).

    python -m train --config configs/sdxl_full.py --model sdxl-base/ --data DIR --output runs/sdxl
    python -m train --config configs/sdxl_full.py:tiny --data DIR --output runs/tiny   # random tiny SDXL, seconds
"""

from train.config import Images, Optim, Outputs, TrainConfig, variant_of


def get_config(variant: str | None = None) -> TrainConfig:
    config = TrainConfig(
        mode="full",
        dtype="bfloat16",
        remat="full",
        optim=Optim(
            steps=10000, batch_size=1, grad_accum=4, learning_rate=1e-6, lr_schedule="constant", max_grad_norm=1.0
        ),
        images=Images(resolution=1024, center_crop=True, random_flip=True, cache_text_embeddings=True),
        outputs=Outputs(checkpoint_every=500, sample_every=1000, sample_prompts=("a photo of a cat",)),
    )
    return variant_of(config, variant, "sdxl_full", model="random:tiny-sdxl", learning_rate=1e-3)

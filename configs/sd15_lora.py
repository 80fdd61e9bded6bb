"""LoRA fine-tune of SD 1.5's attention projections (diffusers' train_text_to_image_lora.py settings:
rank 4, lr 1e-4, batch 1 x 4 accumulation). The result, OUTPUT/final/pytorch_lora_weights.safetensors,
loads in diffusers (`load_lora_weights`), in sample.py (`--lora`) and, as the kohya copy, in A1111.

    python -m train --config configs/sd15_lora.py --model path/to/stable-diffusion-v1-5 --data DIR --output runs/lora
    python -m train --config configs/sd15_lora.py:tiny --data DIR --output runs/tiny
"""

from train.config import Images, LoRA, Optim, Outputs, TrainConfig, variant_of


def get_config(variant: str | None = None) -> TrainConfig:
    config = TrainConfig(
        mode="lora",
        dtype="bfloat16",
        remat="dots",
        optim=Optim(
            steps=15000,
            batch_size=1,
            grad_accum=4,
            learning_rate=1e-4,
            lr_schedule="cosine",
            warmup_steps=0,
            max_grad_norm=1.0,
        ),
        images=Images(resolution=512, random_flip=True),
        adapter=LoRA(rank=4, alpha=4.0),
        outputs=Outputs(checkpoint_every=500, sample_every=1000, sample_prompts=("a photo of a cat",)),
    )
    return variant_of(config, variant, "sd15_lora", learning_rate=1e-2)

"""LoRA fine-tune of SDXL base (diffusers' train_text_to_image_lora_sdxl.py settings: rank 4, lr 1e-4,
1024x1024, batch 1 x 4 accumulation). OUTPUT/final/ holds the PEFT file diffusers' `load_lora_weights`
reads and the kohya copy (SGM names, lora_te1_/lora_te2_) A1111 and ComfyUI read; `--lora-text-encoder
true` trains both text encoders' projections too.

    python -m train --config configs/sdxl_lora.py --model sdxl-base/ --data DIR --output runs/lora
    python -m train --config configs/sdxl_lora.py:tiny --data DIR --output runs/tiny
"""

from train.config import Images, LoRA, Optim, Outputs, TrainConfig, variant_of


def get_config(variant: str | None = None) -> TrainConfig:
    config = TrainConfig(
        mode="lora",
        dtype="bfloat16",
        remat="dots",
        optim=Optim(
            steps=10000, batch_size=1, grad_accum=4, learning_rate=1e-4, lr_schedule="constant", max_grad_norm=1.0
        ),
        images=Images(resolution=1024, random_flip=True),
        adapter=LoRA(rank=4, alpha=4.0),
        outputs=Outputs(checkpoint_every=500, sample_every=1000, sample_prompts=("a photo of a cat",)),
    )
    return variant_of(config, variant, "sdxl_lora", model="random:tiny-sdxl", learning_rate=1e-2)

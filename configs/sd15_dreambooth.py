"""DreamBooth on SD 1.5 with prior preservation (diffusers' train_dreambooth.py settings: lr 5e-6, 400
steps, 200 class images drawn by sdjax itself when --class-data has fewer). Set --instance-prompt and
--class-prompt for your subject; add --lora true for a LoRA DreamBooth.

    python -m train --config configs/sd15_dreambooth.py --model path/to/stable-diffusion-v1-5 --data my_dog/ \
        --output runs/dog --instance-prompt "a photo of sks dog" --class-prompt "a photo of dog"
    python -m train --config configs/sd15_dreambooth.py:tiny --data DIR --output runs/tiny
"""

from train.config import DreamBooth, Images, Optim, Outputs, TrainConfig, variant_of


def get_config(variant: str | None = None) -> TrainConfig:
    config = TrainConfig(
        mode="dreambooth",
        dtype="bfloat16",
        remat="full",
        optim=Optim(steps=400, batch_size=1, learning_rate=5e-6, max_grad_norm=1.0),
        images=Images(resolution=512, instance_prompt="a photo of sks dog"),
        dreambooth=DreamBooth(
            class_prompt="a photo of dog", num_class_images=200, prior_loss_weight=1.0, class_sample_steps=25
        ),
        outputs=Outputs(checkpoint_every=100, sample_prompts=("a photo of sks dog in a bucket",)),
    )
    return variant_of(
        config,
        variant,
        "sd15_dreambooth",
        steps=10,
        learning_rate=1e-3,
        num_class_images=4,
        class_sample_steps=4,
        checkpoint_every=5,
        instance_prompt="a photo of sks square",
        class_prompt="a photo of a square",
    )

"""Textual inversion on SD 1.5 (diffusers' textual_inversion.py settings: lr 5e-4 x batch, 3000 steps):
only the placeholder token's embedding vectors are trained; the result, learned_embeds.safetensors, loads
in diffusers (`load_textual_inversion`) and in sample.py (`--embedding`).

    python -m train --config configs/sd15_textual_inversion.py --model path/to/stable-diffusion-v1-5 \
        --data cat_toy/ --output runs/ti --placeholder-token "<cat-toy>" --initializer-token toy \
        --instance-prompt "a photo of a <cat-toy>"
    python -m train --config configs/sd15_textual_inversion.py:tiny --data DIR --output runs/tiny
"""

from train.config import Images, Optim, Outputs, TextualInversion, TrainConfig, variant_of


def get_config(variant: str | None = None) -> TrainConfig:
    config = TrainConfig(
        mode="textual_inversion",
        dtype="bfloat16",
        remat="full",
        optim=Optim(steps=3000, batch_size=1, grad_accum=4, learning_rate=2e-3, weight_decay=0.0, max_grad_norm=0.0),
        images=Images(resolution=512, random_flip=True, instance_prompt="a photo of a <concept>"),
        inversion=TextualInversion(placeholder_token="<concept>", initializer_token="toy", num_vectors=1),
        outputs=Outputs(checkpoint_every=500, sample_prompts=("a photo of a <concept> on a beach",)),
    )
    return variant_of(config, variant, "sd15_textual_inversion", learning_rate=5e-2, sample_prompts=())

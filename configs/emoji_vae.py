"""Stage 1 of the bundled demo model: the VAE (64x64 RGB -> 16x16x4 latents), trained from scratch on the
emoji data set (`python -m train.emoji_data --out data/emoji`); the scaling factor is set from the trained
latents at the end.

    python -m train --config configs/emoji_vae.py --data data/emoji --output runs/emoji-vae
"""

from train.config import Images, Objective, Optim, Outputs, TrainConfig, variant_of


def get_config(variant: str | None = None) -> TrainConfig:
    config = TrainConfig(
        mode="vae",
        architecture="configs/emoji_demo/architecture",
        seed=0,
        optim=Optim(
            batch_size=16,
            steps=1200,
            learning_rate=1e-3,
            lr_schedule="cosine",
            warmup_steps=100,
            weight_decay=0.0,
            max_grad_norm=1.0,
        ),
        images=Images(resolution=64),
        objective=Objective(kl_weight=1e-6),
        outputs=Outputs(checkpoint_every=250, log_every=10),
    )
    return variant_of(
        config, variant, "emoji_vae", model=None, steps=20, batch_size=4, checkpoint_every=10, log_every=1
    )

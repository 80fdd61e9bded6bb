"""Stage 2 of the bundled demo model: a UNet of 4.1M parameters and a CLIP text encoder of 3.4M (the real
CLIP tokenizer), both from scratch, on the latents of stage 1's VAE, on the colour-and-shape emoji set
(`python -m train.emoji_colours`: 68 shapes, each in its own colours and in six named ones, 3 renderings:
1,428 images). Epsilon prediction with the UNet's noise prediction initialised to its input
(unet_init="identity"), the loss weighted as an x0 loss clipped to SNR in [1, 5] (snr_floor 1, min-SNR-5),
10% caption dropout for classifier-free guidance, EMA; plain epochs (every caption has as many images).
Its export (fp16) is sdjax/data/demo; its figures and those of the models before it are in the README,
"The bundled demo model".

    python -m train --config configs/emoji_unet.py --data data/emoji-colours --model runs/emoji-vae/final \
        --output runs/emoji-unet
"""

from train.config import Images, Objective, Optim, Outputs, TrainConfig, variant_of


def get_config(variant: str | None = None) -> TrainConfig:
    config = TrainConfig(
        mode="full",
        model="runs/emoji-vae/final",
        architecture="configs/emoji_demo/architecture",
        scratch=("unet", "text_encoder"),
        unet_init="identity",
        train_text_encoder=True,
        seed=0,
        optim=Optim(
            batch_size=32,
            steps=4000,
            learning_rate=6e-4,
            lr_schedule="cosine",
            warmup_steps=100,
            weight_decay=0.01,
            max_grad_norm=1.0,
            ema_decay=0.995,
        ),
        images=Images(resolution=64, cache_latents=True, sampling_weight_power=0.0, caption_dropout=0.1),
        objective=Objective(min_snr_gamma=5.0, snr_floor=1.0, noise_offset=0.0),
        outputs=Outputs(
            checkpoint_every=500,
            log_every=10,
            sample_every=1500,
            sample_prompts=("an emoji of blue heart", "an emoji of green rocket", "an emoji of red apple"),
            sample_steps=20,
            export_dtype="float16",
        ),
    )
    return variant_of(
        config,
        variant,
        "emoji_unet",
        model=config.model,
        steps=20,
        batch_size=8,
        checkpoint_every=10,
        log_every=1,
        sample_every=0,
    )

"""Stage 3 of the bundled demo model: 1,000 more steps of stage 2's UNet and text encoder at a lower learning
rate (2e-4, cosine), from stage 2's exported folder (EMA weights), the same objective, plain epochs (stage
2's colour-weighted draws here too kept the hearts but cost retrieval: README, "The bundled demo model").
Its export is sdjax/data/demo.

    python -m train --config configs/emoji_unet_refine.py --data data/emoji --model runs/emoji-unet/final \
        --output runs/emoji-unet-refine
"""

from pathlib import Path

from train.config import TrainConfig, load_config_file, variant_of


def get_config(variant: str | None = None) -> TrainConfig:
    # stage 2's config with these changes (flat names: replace routes each to its group)
    config = load_config_file(str(Path(__file__).with_name("emoji_unet.py"))).replace(
        model="runs/emoji-unet/final",
        scratch=(),
        steps=1000,
        learning_rate=2e-4,
        warmup_steps=50,
        sampling_weight_power=0.0,
        sample_every=0,
    )
    # tiny: the run on stage 2's folder for 20 steps (TrainConfig.tiny), at stage 2's tiny batch
    return variant_of(config, variant, "emoji_unet_refine", model=config.model, batch_size=8, log_every=1)

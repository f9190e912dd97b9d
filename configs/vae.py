"""The Open-Sora 1.2 VAE training stages (release ``configs/vae/train/stage{1,2,3}.py``, report_03) as
``VAETrainConfig`` values, plus tiny variants for CPU smoke runs.

stage 1: 17 frames at 256x256, 2D VAE frozen, temporal-latent reconstruction + the image identity loss
         on the 20% one-frame batches (temporal latents of an image -> its 2D latents).
stage 2: the same data, identity loss off, temporal VAE only. (The release's stage-2 config sets
         freeze_vae_2d=False, but with only the latent loss the 2D VAE receives gradient just through
         the target; the report describes stage 2 as temporal-VAE-only, which is what this does.)
stage 3: 33 frames, random clip lengths 1..33, pixel reconstruction (+ KL), whole VAE trained.
All: lr 1e-5, AdamW (wd 0), grad clip 1.0, bf16, gradient checkpointing, batch 1 per GPU, KL weight
1e-6. The LPIPS perceptual term (weight 0.1 in the release) runs when local VGG16 + LPIPS weights are
given (`--lpips-weights`).
"""

from dataclasses import replace

from opensora_fast.models.vae import OpenSoraVAEConfig
from opensora_fast.vae_train import VAETrainConfig

STAGE1 = VAETrainConfig(
    stage=1,
    freeze_spatial=True,
    use_real_rec_loss=False,
    use_z_rec_loss=True,
    use_image_identity_loss=True,
    mixed_strategy="mixed_video_image",
    mixed_image_ratio=0.2,
    num_frames=17,
    image_size=(256, 256),
)

STAGE2 = replace(STAGE1, stage=2, use_image_identity_loss=False)

STAGE3 = VAETrainConfig(
    stage=3,
    freeze_spatial=False,
    use_real_rec_loss=True,
    use_z_rec_loss=False,
    use_image_identity_loss=False,
    mixed_strategy="mixed_video_random",
    num_frames=33,
    image_size=(256, 256),
)

STAGES = {1: STAGE1, 2: STAGE2, 3: STAGE3}


def tiny(stage: int, **overrides) -> VAETrainConfig:
    """A stage with the tiny model, 17 frames at 16x16, no checkpointing, a larger lr: CPU tests."""
    base = dict(model=OpenSoraVAEConfig.tiny(), num_frames=17, image_size=(16, 16), grad_checkpoint=False, lr=1e-3)
    return replace(STAGES[stage], **{**base, **overrides})

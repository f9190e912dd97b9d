"""Open-Sora 1.2's STDiT3 sample and train configs (configs/opensora-v1-2/{inference/sample.py,
train/stage1.py} at tag v1.2.0) as dataclasses; values from ../shared/reference/opensora-v1.2.md."""

from __future__ import annotations

from dataclasses import dataclass, field

from opensora_fast.masks import STAGE1_MASK_RATIOS
from opensora_fast.models.stdit3 import STDiT3Config
from opensora_fast.rflow import RFlow


@dataclass
class TextEncoderConfig:
    from_pretrained: str = "DeepFloyd/t5-v1_1-xxl"  # a local directory for opensora_fast (no downloads)
    model_max_length: int = 300
    dtype: str = "fp32"  # Open-Sora runs T5 in fp32 at inference


@dataclass
class SampleConfig:
    """inference/sample.py: 240p 9:16, 51 frames (4 s at 24 fps -> 15 latent frames), bf16."""

    resolution: str = "240p"
    aspect_ratio: str = "9:16"
    num_frames: int = 51
    fps: int = 24
    save_fps: int = 24
    seed: int = 42
    batch_size: int = 1
    dtype: str = "bf16"
    aes: float | None = 6.5
    condition_frame_length: int = 5
    align: int = 5
    model_from_pretrained: str = "hpcai-tech/OpenSora-STDiT-v3"  # a local path for opensora_fast
    model: STDiT3Config = field(default_factory=lambda: STDiT3Config.xl_2(enable_flash_attn=True))
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: RFlow = field(
        default_factory=lambda: RFlow(num_sampling_steps=30, cfg_scale=7.0, use_timestep_transform=True)
    )


@dataclass
class TrainConfig:
    """train/stage1.py: logit-normal rflow with the timestep transform, AdamW lr 1e-4 eps 1e-15,
    grad clip 1.0, 1000 warm-up steps, EMA 0.99, bf16, gradient checkpointing, frozen y_embedder."""

    dtype: str = "bf16"
    grad_checkpoint: bool = True
    lr: float = 1e-4
    adam_eps: float = 1e-15
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 1000
    ema_decay: float = 0.99
    seed: int = 42
    epochs: int = 1000
    log_every: int = 10
    ckpt_every: int = 200
    model: STDiT3Config = field(default_factory=lambda: STDiT3Config.xl_2(freeze_y_embedder=True, grad_checkpoint=True))
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: RFlow = field(default_factory=lambda: RFlow(use_timestep_transform=True, sample_method="logit-normal"))
    mask_ratios: dict = field(default_factory=lambda: dict(STAGE1_MASK_RATIOS))  # opensora_fast.masks


# ---------------------------------------------------------------------------------------------
# ``opensora-fast train --preset stage1|stage2|stage3``: Open-Sora 1.2's configs/opensora-v1-2/train/stage{1,2,3}.py
# (read at hpcaitech/Open-Sora commits f8a4fd5 / 3b6d136 / 0bbd518 of those files) as values of the train
# options (``opensora_fast.train.DiTTrainConfig`` / ``TrainRun`` field names). bucket_config is Open-Sora's:
# resolution -> {num_frames: (keep probability, batch size)}; a probability pair (p, q) is (keep probability at
# this resolution, probability of trying this length). Stage 2 has no warm-up (its config sets none).

STAGE1_BUCKET_CONFIG = {
    "144p": {1: (1.0, 475), 51: (1.0, 51), 102: ((1.0, 0.33), 27), 204: ((1.0, 0.1), 13), 408: ((1.0, 0.1), 6)},
    "256": {1: (0.4, 297), 51: (0.5, 20), 102: ((0.5, 0.33), 10), 204: ((0.5, 0.1), 5), 408: ((0.5, 0.1), 2)},
    "240p": {1: (0.3, 297), 51: (0.4, 20), 102: ((0.4, 0.33), 10), 204: ((0.4, 0.1), 5), 408: ((0.4, 0.1), 2)},
    "360p": {1: (0.2, 141), 51: (0.15, 8), 102: ((0.15, 0.33), 4), 204: ((0.15, 0.1), 2), 408: ((0.15, 0.1), 1)},
    "512": {1: (0.1, 141)},
    "480p": {1: (0.1, 89)},
    "720p": {1: (0.05, 36)},
    "1024": {1: (0.05, 36)},
    "1080p": {1: (0.1, 5)},
    "2048": {1: (0.1, 5)},
}
STAGE2_BUCKET_CONFIG = {
    "144p": {1: (1.0, 475), 51: (1.0, 51), 102: ((1.0, 0.33), 27), 204: ((1.0, 0.1), 13), 408: ((1.0, 0.1), 6)},
    "256": {1: (0.4, 297), 51: (0.5, 20), 102: ((0.5, 0.33), 10), 204: ((0.5, 1.0), 5), 408: ((0.5, 1.0), 2)},
    "240p": {1: (0.3, 297), 51: (0.4, 20), 102: ((0.4, 0.33), 10), 204: ((0.4, 1.0), 5), 408: ((0.4, 1.0), 2)},
    "360p": {1: (0.5, 141), 51: (0.15, 8), 102: ((0.3, 0.5), 4), 204: ((0.3, 1.0), 2), 408: ((0.5, 0.5), 1)},
    "512": {1: (0.4, 141), 51: (0.15, 8), 102: ((0.2, 0.4), 4), 204: ((0.2, 1.0), 2), 408: ((0.4, 0.5), 1)},
    "480p": {1: (0.5, 89), 51: (0.2, 5), 102: (0.2, 2), 204: (0.1, 1)},
    "720p": {1: (0.1, 36), 51: (0.03, 1)},
    "1024": {1: (0.1, 36), 51: (0.02, 1)},
    "1080p": {1: (0.01, 5)},
    "2048": {1: (0.01, 5)},
}
STAGE3_BUCKET_CONFIG = {
    "144p": {1: (1.0, 475), 51: (1.0, 51), 102: (1.0, 27), 204: (1.0, 13), 408: (1.0, 6)},
    "256": {1: (1.0, 297), 51: (0.5, 20), 102: (0.5, 10), 204: (0.5, 5), 408: ((0.5, 0.5), 2)},
    "240p": {1: (1.0, 297), 51: (0.5, 20), 102: (0.5, 10), 204: (0.5, 5), 408: ((0.5, 0.4), 2)},
    "360p": {1: (1.0, 141), 51: (0.5, 8), 102: (0.5, 4), 204: (0.5, 2), 408: ((0.5, 0.3), 1)},
    "512": {1: (1.0, 141), 51: (0.5, 8), 102: (0.5, 4), 204: (0.5, 2), 408: ((0.5, 0.2), 1)},
    "480p": {1: (1.0, 89), 51: (0.5, 5), 102: (0.5, 3), 204: ((0.5, 0.5), 1), 408: (0.0, None)},
    "720p": {1: (0.3, 36), 51: (0.2, 2), 102: (0.1, 1), 204: (0.0, None)},
    "1024": {1: (0.3, 36), 51: (0.1, 2), 102: (0.1, 1), 204: (0.0, None)},
    "1080p": {1: (0.1, 5)},
    "2048": {1: (0.05, 5)},
}
_COMMON = dict(lr=1e-4, adam_eps=1e-15, grad_clip=1.0, ema_decay=0.99, dtype="bf16", grad_checkpoint=True,
               seed=42, log_every=10, ckpt_every=200)  # fmt: skip
PRESETS = {
    "stage1": dict(_COMMON, warmup_steps=1000, mask_ratios="stage1", bucket_config=STAGE1_BUCKET_CONFIG),
    # stage2.py at tag v1.2.0 has stage 1's mask ratios (a later commit, 3b6d136, changed them) and no warm-up
    "stage2": dict(_COMMON, warmup_steps=0, mask_ratios="stage2", bucket_config=STAGE2_BUCKET_CONFIG),
    "stage3": dict(_COMMON, warmup_steps=1000, mask_ratios="stage3", bucket_config=STAGE3_BUCKET_CONFIG),
}

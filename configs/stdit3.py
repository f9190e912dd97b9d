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
    model: STDiT3Config = field(
        default_factory=lambda: STDiT3Config.xl_2(freeze_y_embedder=True, grad_checkpoint=True)
    )
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: RFlow = field(
        default_factory=lambda: RFlow(use_timestep_transform=True, sample_method="logit-normal")
    )
    mask_ratios: dict = field(default_factory=lambda: dict(STAGE1_MASK_RATIOS))  # opensora_fast.masks

"""Open-Sora 1.2's video VAE (``OpenSoraVAE_V1_2``, reference doc §3): the SDXL 2D VAE per frame, then
the causal temporal VAE per chunk of 17 frames, then per-channel latent normalisation.

    encode:  x (B, 3, T, H, W) in [-1, 1] -> 2D VAE (x 0.18215) -> (B, 4, T, H/8, W/8)
             -> temporal VAE per 17-frame chunk (17 -> 5 latent frames) -> z = (z - shift) / scale
    decode:  z * scale + shift -> temporal decode per 5-latent-frame chunk -> 2D decode (/ 0.18215)

State-dict names are the release's: ``spatial_vae.module.*`` (a diffusers ``AutoencoderKL``),
``temporal_vae.*``, ``scale``, ``shift`` (buffers of shape (1, 4, 1, 1, 1)).

Inference (``encode`` / ``decode``) streams: one temporal chunk at a time, the 2D VAE in micro-batches
of 4 frames, results written into a preallocated output that may live on another device (e.g. the CPU),
so accelerator memory does not grow with clip length. ``forward`` is the training path (no latent
normalisation, autograd kept, as the release's ``cal_loss=True``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from diffusers.models import AutoencoderKL

from opensora_fast.models.vae_temporal import DiagonalGaussian, GroupNorm, TemporalVAEConfig, VAE_Temporal_SD

SD_SCALING_FACTOR = 0.18215  # Open-Sora hard-codes SD's factor (the SDXL config says 0.13025)


@dataclass(frozen=True)
class SpatialVAEConfig:
    """The diffusers ``AutoencoderKL`` config; the defaults are the SDXL VAE's."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    in_channels: int = 3
    sample_size: int = 1024
    micro_batch_size: int = 4  # frames per 2D VAE call

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class OpenSoraVAEConfig:
    spatial: SpatialVAEConfig = field(default_factory=SpatialVAEConfig)
    temporal: TemporalVAEConfig = field(default_factory=TemporalVAEConfig)
    micro_frame_size: int = 17  # frames per temporal VAE call
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)
    scaling_factor: float = SD_SCALING_FACTOR

    @classmethod
    def v1_2(cls) -> OpenSoraVAEConfig:
        return cls()

    @classmethod
    def tiny(cls, filters: int = 8, num_res_blocks: int = 1) -> OpenSoraVAEConfig:
        """A few-thousand-parameter model for CPU tests: 2x spatial, 4x temporal compression."""
        return cls(
            spatial=SpatialVAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32),
            temporal=TemporalVAEConfig(filters=filters, num_res_blocks=num_res_blocks, num_groups=4),
        )

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> OpenSoraVAEConfig:
        def tup(v):
            return tuple(v) if isinstance(v, list) else v

        sp = SpatialVAEConfig(**{k: tup(v) for k, v in d["spatial"].items()})
        te = TemporalVAEConfig(**{k: tup(v) for k, v in d["temporal"].items()})
        rest = {k: tup(v) for k, v in d.items() if k not in ("spatial", "temporal")}
        return cls(spatial=sp, temporal=te, **rest)

    @classmethod
    def from_json_beside(cls, path: str) -> OpenSoraVAEConfig | None:
        """The config in ``config.json`` next to a checkpoint, if save_pretrained wrote it (keys "spatial"
        and "temporal"); None otherwise, e.g. for the release directory, whose config.json is Open-Sora's."""
        cfg_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
        if not os.path.isfile(cfg_file):
            return None
        with open(cfg_file) as f:
            d = json.load(f)
        return cls.from_dict(d) if "spatial" in d and "temporal" in d else None


def _fused_norm(norm: nn.GroupNorm) -> GroupNorm:
    """Our GroupNorm (group_norm_silu, SiLU fused) holding the same weight/bias Parameters as ``norm``."""
    fused = GroupNorm(norm.num_groups, norm.num_channels, norm.eps)
    fused.weight, fused.bias = norm.weight, norm.bias
    return fused


def fuse_group_norm_silu(module: nn.Module) -> int:
    """Run the GroupNorm + SiLU pairs of a diffusers AutoencoderKL on ``group_norm_silu``, in place.

    Every ``ResnetBlock2D`` without a time embedding (all of the VAE's) gets fused ``norm1`` / ``norm2``
    and an identity ``nonlinearity`` (its only uses follow those two norms); the encoder's and decoder's
    ``conv_norm_out`` + ``conv_act`` likewise. Parameter names and values are unchanged, so state dicts
    load as before. The attention blocks' GroupNorm (no SiLU) stays diffusers'. Returns the number of
    fused norms."""
    from diffusers.models.resnet import ResnetBlock2D

    count = 0
    for m in module.modules():
        if (
            isinstance(m, ResnetBlock2D)
            and m.time_emb_proj is None
            and isinstance(m.nonlinearity, nn.SiLU)
            and isinstance(m.norm1, nn.GroupNorm)
            and isinstance(m.norm2, nn.GroupNorm)
            and m.norm1.affine
            and m.norm2.affine
        ):
            m.norm1, m.norm2, m.nonlinearity = _fused_norm(m.norm1), _fused_norm(m.norm2), nn.Identity()
            count += 2
        elif (
            isinstance(getattr(m, "conv_norm_out", None), nn.GroupNorm)
            and isinstance(getattr(m, "conv_act", None), nn.SiLU)
            and m.conv_norm_out.affine
        ):
            m.conv_norm_out, m.conv_act = _fused_norm(m.conv_norm_out), nn.Identity()
            count += 1
    return count


class SpatialVAE(nn.Module):
    """Per-frame 2D VAE; ``.module`` is the diffusers AutoencoderKL (names ``spatial_vae.module.*``)."""

    def __init__(self, cfg: SpatialVAEConfig, scaling_factor: float = SD_SCALING_FACTOR):
        super().__init__()
        self.cfg, self.scaling_factor = cfg, scaling_factor
        n = len(cfg.block_out_channels)
        self.module = AutoencoderKL(
            in_channels=cfg.in_channels,
            out_channels=cfg.in_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups,
            sample_size=cfg.sample_size,
        )
        # the ResNet blocks' GroupNorm + SiLU pairs (most of the 2D VAE's non-conv time) on our kernel
        self.fused_norms = fuse_group_norm_silu(self.module)

    def encode_frames(self, x: torch.Tensor, sample: bool, generator=None) -> torch.Tensor:
        """x (N, 3, H, W) -> scaled latents (N, 4, H/f, W/f)."""
        dist = self.module.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return z * self.scaling_factor

    def decode_frames(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """z (N, 4, h, w) scaled latents -> (N, 3, h*f, w*f). ``tile`` (pixels) decodes overlapping
        spatial tiles (diffusers' blended tiled decode) when the frame is larger than one tile."""
        z = z / self.scaling_factor
        if tile is not None and max(z.shape[-2:]) * self.cfg.downsample > tile:
            m = self.module
            m.tile_sample_min_size, m.tile_latent_min_size = tile, tile // self.cfg.downsample
            return m.tiled_decode(z).sample
        return self.module.decode(z).sample


@dataclass
class VAEForward:
    """Training outputs: pixels / 2D latents reconstructed, temporal latents, posterior, 2D latents."""

    x_rec: torch.Tensor | None
    x_z_rec: torch.Tensor
    z: torch.Tensor
    posterior: DiagonalGaussian
    x_z: torch.Tensor


class StateDictMismatchError(ValueError):
    pass


class OpenSoraVAE(nn.Module):
    """``VideoAutoencoderPipeline`` with the 1.2 release's configuration by default."""

    def __init__(self, cfg: OpenSoraVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or OpenSoraVAEConfig()
        if cfg.spatial.latent_channels != cfg.temporal.in_out_channels:
            raise ValueError("spatial.latent_channels must equal temporal.in_out_channels")
        self.spatial_vae = SpatialVAE(cfg.spatial, cfg.scaling_factor)
        self.temporal_vae = VAE_Temporal_SD(cfg.temporal)
        c = cfg.temporal.embed_dim
        if len(cfg.shift) != c or len(cfg.scale) != c:
            raise ValueError(f"shift and scale need {c} values (one per latent channel)")
        self.register_buffer("scale", torch.tensor(cfg.scale, dtype=torch.float32).reshape(1, c, 1, 1, 1))
        self.register_buffer("shift", torch.tensor(cfg.shift, dtype=torch.float32).reshape(1, c, 1, 1, 1))
        self.out_channels = c

    # ------------------------------------------------------------------ sizes

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def micro_z_frame_size(self) -> int:
        return self.temporal_vae.latent_frames(self.cfg.micro_frame_size)

    def latent_frames(self, num_frames: int) -> int:
        """5 * (F // 17) + ceil((F % 17) / 4) for the release: 51 -> 15, 102 -> 30, 408 -> 120, 1 -> 1."""
        m = self.cfg.micro_frame_size
        full, rest = divmod(num_frames, m)
        return full * self.micro_z_frame_size + (self.temporal_vae.latent_frames(rest) if rest else 0)

    def get_latent_size(self, input_size):
        """(T, H, W) -> latent (t, h, w); None entries stay None."""
        T, H, W = input_size
        f = self.cfg.spatial.downsample
        return [
            None if T is None else self.latent_frames(T),
            None if H is None else H // f,
            None if W is None else W // f,
        ]

    def set_grad_checkpoint(self, enabled: bool = True) -> None:
        self.temporal_vae.set_grad_checkpoint(enabled)
        if enabled:
            self.spatial_vae.module.enable_gradient_checkpointing()
        else:
            self.spatial_vae.module.disable_gradient_checkpointing()

    # ------------------------------------------------------------------ 2D VAE over many frames

    def _spatial_encode(self, x: torch.Tensor, sample: bool, generator=None) -> torch.Tensor:
        """x (B, 3, T, H, W) -> (B, 4, T, h, w), micro-batches of frames taken over (B T)."""
        B, _, T = x.shape[:3]
        frames = x.transpose(1, 2).flatten(0, 1)
        bs = self.cfg.spatial.micro_batch_size
        z = [self.spatial_vae.encode_frames(frames[i : i + bs], sample, generator) for i in range(0, B * T, bs)]
        return torch.cat(z).unflatten(0, (B, T)).transpose(1, 2)

    def _spatial_decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        B, _, T = z.shape[:3]
        frames = z.transpose(1, 2).flatten(0, 1)
        bs = self.cfg.spatial.micro_batch_size
        x = [self.spatial_vae.decode_frames(frames[i : i + bs], tile) for i in range(0, B * T, bs)]
        return torch.cat(x).unflatten(0, (B, T)).transpose(1, 2)

    # ------------------------------------------------------------------ inference

    def _check_video(self, video: torch.Tensor) -> None:
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != self.cfg.spatial.in_channels:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be (B, {self.cfg.spatial.in_channels}, T, H, W), got {shape}")
        f = self.cfg.spatial.downsample
        if video.shape[3] % f or video.shape[4] % f:
            raise ValueError(f"video height and width must be multiples of {f}, got {tuple(video.shape[3:])}")

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = True, generator=None, out_device=None) -> torch.Tensor:
        """video (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, 4, t, H/8, W/8).

        ``sample=False`` takes the posterior means of both VAEs. The video may live on another
        device than the model (chunks move over one at a time); the latents go to ``out_device``
        (default: the video's device)."""
        self._check_video(video)
        B, _, T, H, W = video.shape
        m = self.cfg.micro_frame_size
        t, h, w = self.get_latent_size((T, H, W))
        out_device = video.device if out_device is None else torch.device(out_device)
        out = torch.empty(B, self.out_channels, t, h, w, dtype=self.dtype, device=out_device)
        zt = 0
        for i in range(0, T, m):
            chunk = video[:, :, i : i + m].to(device=self.device, dtype=self.dtype)
            x_z = self._spatial_encode(chunk, sample, generator)
            posterior = self.temporal_vae.encode(x_z)
            z = posterior.sample(generator) if sample else posterior.mode()
            z = (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)
            out[:, :, zt : zt + z.shape[2]] = z.to(out_device)
            zt += z.shape[2]
        return out

    @torch.no_grad()
    def decode_chunks(
        self, latents: torch.Tensor, num_frames: int, spatial_tile: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first_frame, frames (B, 3, f, H, W)) per temporal chunk (17 frames for the release,
        fewer for the last), unclamped, on the model's device: peak memory is one chunk's."""
        self._check_latents(latents, num_frames)
        mz, m = self.micro_z_frame_size, self.cfg.micro_frame_size
        for k, i in enumerate(range(0, latents.shape[2], mz)):
            z = latents[:, :, i : i + mz].to(device=self.device, dtype=self.dtype)
            z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
            x_z = self.temporal_vae.decode(z, num_frames=min(m, num_frames - k * m))
            yield k * m, self._spatial_decode(x_z, spatial_tile)

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        num_frames: int,
        *,
        out: torch.Tensor | None = None,
        out_device=None,
        spatial_tile: int | None = None,
    ) -> torch.Tensor:
        """latents (B, 4, t, h, w) -> video (B, 3, num_frames, h*8, w*8) clamped to [-1, 1].

        Streams chunk by chunk (``decode_chunks``) into ``out`` (preallocated here on ``out_device``,
        default the latents' device, in the model dtype, unless given). With ``out_device="cpu"`` the
        accelerator holds one chunk at a time whatever the clip length."""
        B, _, _, h, w = latents.shape
        f = self.cfg.spatial.downsample
        shape = (B, self.cfg.spatial.in_channels, num_frames, h * f, w * f)
        if out is None:
            out_device = latents.device if out_device is None else torch.device(out_device)
            out = torch.empty(shape, dtype=self.dtype, device=out_device)
        elif tuple(out.shape) != shape:
            raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
        for t0, frames in self.decode_chunks(latents, num_frames, spatial_tile):
            out[:, :, t0 : t0 + frames.shape[2]] = frames.clamp_(-1, 1).to(out.device)
        return out

    def _check_latents(self, latents: torch.Tensor, num_frames: int) -> None:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != self.out_channels:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be (B, {self.out_channels}, t, h, w), got {shape}")
        if num_frames < 1 or self.latent_frames(num_frames) != latents.shape[2]:
            raise ValueError(
                f"num_frames={num_frames} needs {self.latent_frames(max(num_frames, 1))} latent frames, "
                f"got latents with {latents.shape[2]}"
            )

    # ------------------------------------------------------------------ training

    def forward(self, x: torch.Tensor, generator=None, decode_pixels: bool = True) -> VAEForward:
        """Training pass on x (B, 3, T, H, W) (the release's ``cal_loss=True``: latents not normalised).

        The 2D VAE samples its posterior, the temporal VAE runs per 17-frame chunk and samples too;
        ``posterior`` covers every chunk. The 2D VAE runs without autograd when all its parameters are
        frozen. ``decode_pixels=False`` skips the 2D decode (``x_rec`` is None)."""
        self._check_video(x)
        spatial_trainable = any(p.requires_grad for p in self.spatial_vae.parameters())
        with torch.set_grad_enabled(spatial_trainable and torch.is_grad_enabled()):
            x_z = self._spatial_encode(x, True, generator)
        m = self.cfg.micro_frame_size
        posts, zs, recs = [], [], []
        for i in range(0, x_z.shape[2], m):
            chunk = x_z[:, :, i : i + m]
            post = self.temporal_vae.encode(chunk)
            z = post.sample(generator)
            posts.append(post)
            zs.append(z)
            recs.append(self.temporal_vae.decode(z, num_frames=chunk.shape[2]))
        x_z_rec = torch.cat(recs, dim=2)
        x_rec = self._spatial_decode(x_z_rec) if decode_pixels else None
        return VAEForward(x_rec, x_z_rec, torch.cat(zs, dim=2), DiagonalGaussian.cat(posts), x_z)

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, path: str) -> str:
        """Write ``model.safetensors`` and ``config.json`` (each atomically) into directory ``path``;
        returns the weights' path. from_pretrained(path) rebuilds the same architecture from them."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        dst = os.path.join(path, "model.safetensors")
        tmp = dst + f".tmp{os.getpid()}"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, tmp)
        os.replace(tmp, dst)
        tmp = os.path.join(path, f".config.json.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(self.cfg.to_dict(), f, indent=1)
        os.replace(tmp, os.path.join(path, "config.json"))
        return dst

    @classmethod
    def from_pretrained(
        cls, path: str, cfg: OpenSoraVAEConfig | None = None, *, device=None, dtype=None
    ) -> OpenSoraVAE:
        """Build the model and load a local checkpoint: a file (.safetensors, or anything torch.load
        reads with weights_only=True) or a directory holding one. The architecture is ``cfg``, else the
        config.json that save_pretrained wrote beside the weights, else the 1.2 release's. Missing,
        unexpected or mis-shaped keys raise StateDictMismatchError listing them."""
        if cfg is None:
            cfg = OpenSoraVAEConfig.from_json_beside(path)
        state = load_state_dict_file(resolve_checkpoint(path))
        with torch.device("meta"):
            model = cls(cfg)
        check_state_dict(model, state)
        model.load_state_dict(state, strict=True, assign=True)
        model.scale.data = model.scale.float()
        model.shift.data = model.shift.float()
        return model.to(device=device, dtype=dtype)


def resolve_checkpoint(path: str) -> str:
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint file or directory at {path!r}")
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin", "model.pt"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".pt", ".pth", ".bin")))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one checkpoint file in {path!r}, found {found or 'none'}")
    return os.path.join(path, found[0])


def load_state_dict_file(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and set(state) == {key}:
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{file!r} does not hold a state dict (got {type(state).__name__})")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], limit: int = 40) -> None:
    """Raise StateDictMismatchError listing the missing, unexpected and mis-shaped keys (each list cut
    at ``limit`` names, with the total count)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
            if items:
                more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{len(items)} {title} key(s): " + ", ".join(items[:limit]) + more)
        raise StateDictMismatchError("state dict does not match OpenSoraVAE: " + "; ".join(parts))


def num_params(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())

"""Rectified flow for Open-Sora 1.2 (../shared/reference/opensora-v1.2.md §4): training loss with
logit-normal timesteps and the resolution/length-aware shift, and the Euler sampler with
classifier-free guidance and image/video conditioning through a per-frame mask.

Time runs t in [0, 1000], t = 1000 is pure noise: x_t = (1 - t/1000) x0 + (t/1000) noise, and the
model predicts the velocity v = x0 - noise (the first ``in_channels`` output channels).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm import tqdm


def _tensor(v, like: torch.Tensor) -> torch.Tensor:
    return v if torch.is_tensor(v) else torch.full(like.shape, float(v), device=like.device)


def timestep_transform(
    t: torch.Tensor,
    height,
    width,
    num_frames,
    *,
    base_resolution: int = 512 * 512,
    base_num_frames: int = 1,
    scale: float = 1.0,
    num_timesteps: int = 1000,
) -> torch.Tensor:
    """t' = ratio t / (1 + (ratio - 1) t) on t/num_timesteps, ratio = sqrt(H W / 512^2) *
    sqrt(n_lat) * scale, n_lat = 1 for images (num_frames[0] == 1) else max(num_frames // 17 * 5, 1).

    height/width/num_frames are pixel sizes and frame counts, per sample (B,) tensors or numbers.
    As in Open-Sora, the ratio is computed in the dtype of the height/width tensors (bf16 at
    Open-Sora inference, so e.g. sqrt(120) rounds), and t keeps its own dtype.
    """
    t = t / num_timesteps
    height, width, num_frames = (_tensor(v, t) for v in (height, width, num_frames))
    ratio_space = (height * width / base_resolution).sqrt()
    if num_frames[0] == 1:
        n = torch.ones_like(num_frames)
    else:
        # Open-Sora's n is 0 for 2..16 frames: ratio 0 and t' = 0 / 0 = NaN at t = 1, a NaN clip. One latent
        # frame's worth instead (the same t' as an image of that size); 17 frames and more are unchanged
        n = (num_frames // 17 * 5).clamp_min(1)
    ratio = ratio_space * (n / base_num_frames).sqrt() * scale
    return ratio * t / (1 + (ratio - 1) * t) * num_timesteps


def mean_flat(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean over (C, T, H, W); with a (B, T) frame mask, over masked-in frames only."""
    if mask is None:
        return x.mean(dim=list(range(1, x.dim())))
    B, C, T = x.shape[:3]
    x = x.transpose(1, 2).reshape(B, T, -1)  # b t (c h w)
    return (x * mask.unsqueeze(2)).sum(dim=(1, 2)) / (mask.sum(dim=1) * x.shape[-1])


@dataclass
class RFlow:
    """Open-Sora's ``rflow`` scheduler (v1.2 defaults for sampling: 30 steps, cfg 7.0, transform on)."""

    num_sampling_steps: int = 30
    num_timesteps: int = 1000
    cfg_scale: float = 7.0
    use_discrete_timesteps: bool = False
    use_timestep_transform: bool = True
    sample_method: str = "uniform"  # "uniform" | "logit-normal" (training)
    loc: float = 0.0
    scale: float = 1.0
    transform_scale: float = 1.0

    def __post_init__(self):
        if self.sample_method not in ("uniform", "logit-normal"):
            raise ValueError(f"sample_method must be 'uniform' or 'logit-normal', got {self.sample_method!r}")
        if self.sample_method != "uniform" and self.use_discrete_timesteps:
            raise ValueError("discrete timesteps need sample_method='uniform'")

    # ---- forward process -------------------------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(1 - t/T) x0 + (t/T) noise, per sample t (B,)."""
        a = (1 - t.float() / self.num_timesteps).view(-1, *([1] * (x0.dim() - 1)))
        return a * x0 + (1 - a) * noise

    def sample_t(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps in [0, T): uniform, or logit-normal t/T = sigmoid(u), u ~ N(loc, scale)."""
        if self.use_discrete_timesteps:
            return torch.randint(0, self.num_timesteps, (batch,), generator=generator).to(device)
        if self.sample_method == "uniform":
            return torch.rand(batch, generator=generator).to(device) * self.num_timesteps
        u = torch.randn(batch, generator=generator) * self.scale + self.loc
        return torch.sigmoid(u).to(device) * self.num_timesteps

    def training_losses(
        self,
        model,
        x_start: torch.Tensor,
        model_kwargs: dict,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """{"loss": (B,), "t": (B,)}: MSE between the predicted and the true velocity x0 - noise.

        ``mask`` (B, T) bool: frames where it is False are conditioning frames, given clean (x_t at
        t = 0) and left out of the loss. model_kwargs holds y, mask (text), fps, height, width,
        num_frames (and x_mask = mask, as Open-Sora's train script sets it).
        """
        B = x_start.shape[0]
        if t is None:
            t = self.sample_t(B, x_start.device, generator)
            if self.use_timestep_transform:
                t = timestep_transform(
                    t,
                    model_kwargs["height"],
                    model_kwargs["width"],
                    model_kwargs["num_frames"],
                    scale=self.transform_scale,
                    num_timesteps=self.num_timesteps,
                )
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, dtype=x_start.dtype).to(x_start.device)
        x_t = self.add_noise(x_start, noise, t)
        if mask is not None:
            x_t0 = self.add_noise(x_start, noise, torch.zeros_like(t))
            x_t = torch.where(mask[:, None, :, None, None], x_t, x_t0)
        out = model(x_t, t, **model_kwargs)
        v_pred = out[:, : x_start.shape[1]]
        loss = mean_flat((v_pred - (x_start - noise)).pow(2), mask=mask)
        return {"loss": loss, "t": t}

    # ---- sampling --------------------------------------------------------------------------

    def timesteps(self, batch: int, device, height, width, num_frames) -> list[torch.Tensor]:
        """t_i = (1 - i/steps) * T for i < steps, each (B,) and transformed when enabled."""
        ts = [(1.0 - i / self.num_sampling_steps) * self.num_timesteps for i in range(self.num_sampling_steps)]
        if self.use_discrete_timesteps:
            ts = [int(round(t)) for t in ts]
        ts = [torch.tensor([t] * batch, device=device) for t in ts]
        if self.use_timestep_transform:
            ts = [timestep_transform(t, height, width, num_frames, num_timesteps=self.num_timesteps) for t in ts]
        return ts

    @torch.no_grad()
    def sample(
        self,
        model,
        z: torch.Tensor,
        y: torch.Tensor,
        y_null: torch.Tensor,
        *,
        text_mask: torch.Tensor | None = None,
        height,
        width,
        num_frames,
        fps,
        cond_mask: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
        cfg_sequential: bool = False,
    ) -> torch.Tensor:
        """Euler integration from noise z (B, C, T, H, W) at t = 1000 to t = 0.

        y (B, 1, L, D) caption features, y_null (B, 1, L, D) null captions (same text_mask, as in
        Open-Sora); height/width/num_frames/fps per sample (B,). Each step runs one batched CFG
        forward on [z; z] and guides the C velocity channels: v = v_u + s (v_c - v_u).
        ``cond_mask`` (B, T) float (Open-Sora's apply_mask_strategy): frames with mask < t/1000 hold
        the reference latents already in z; x_mask = mask * 1000 >= t selects the t0 modulation, frames
        get fresh noise when they first cross into the noised set, and conditioning frames are
        overwritten with the reference after every step. ``generator`` makes that noise deterministic.
        ``cfg_sequential`` runs the conditional and the unconditional halves one after the other (half the
        activation memory, the same velocities up to floating-point summation order).
        """
        s = self.cfg_scale if guidance_scale is None else guidance_scale
        B, C = z.shape[:2]
        ts = self.timesteps(B, z.device, height, width, num_frames)
        args = dict(mask=text_mask, fps=_cat2(fps), height=_cat2(height), width=_cat2(width))
        y_in = torch.cat([y, y_null], 0)
        noise_added = None
        if cond_mask is not None:
            noise_added = cond_mask == 1
        cache = model.text_kv_cache() if hasattr(model, "text_kv_cache") else contextlib.nullcontext()
        fast = {"velocity_only": True} if hasattr(model, "text_kv_cache") else {}
        with cache:
            for i, t in enumerate(tqdm(ts, desc="rflow", disable=not progress)):
                x_mask = None
                if cond_mask is not None:
                    x0 = z.clone()
                    gdev = generator.device if generator is not None else x0.device  # a CUDA generator draws there
                    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=gdev).to(x0.device)
                    x_noise = self.add_noise(x0, noise, t)
                    upper = cond_mask * self.num_timesteps >= t.unsqueeze(1)
                    x_mask = upper.repeat(2, 1)
                    add = upper & ~noise_added
                    z = torch.where(add[:, None, :, None, None], x_noise, x0)
                    noise_added = upper
                if cfg_sequential:
                    one = dict(mask=text_mask, fps=fps, height=height, width=width, x_mask=x_mask, **fast)
                    if x_mask is not None:
                        one["x_mask"] = x_mask[:B]
                    v_c = model(z, t, y, **one)[:, :C]
                    v_u = model(z, t, y_null, **one)[:, :C]
                else:
                    out = model(torch.cat([z, z], 0), torch.cat([t, t], 0), y_in, x_mask=x_mask, **args, **fast)
                    v_c, v_u = out[:, :C].chunk(2, dim=0)
                v = v_u + s * (v_c - v_u)
                dt = (ts[i] - ts[i + 1]) if i < len(ts) - 1 else ts[i]
                z = z + v * (dt / self.num_timesteps)[:, None, None, None, None]
                if cond_mask is not None:
                    z = torch.where(upper[:, None, :, None, None], z, x0)
        return z


def _cat2(v):
    return torch.cat([v, v], 0) if torch.is_tensor(v) else v

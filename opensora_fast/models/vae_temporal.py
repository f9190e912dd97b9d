"""Open-Sora 1.2's temporal VAE ``VAE_Temporal_SD`` (reference doc §3.3): a causal 3D conv VAE that
compresses the 2D VAE's latents 4x in time (17 frames -> 5), MAGVIT-v2 style.

Parameter names and shapes are the release's (``encoder.conv_in.conv.weight``, ``decoder.conv_out.conv.bias``,
...), so its state dict loads as is. The convolutions and GroupNorm+SiLU pairs run through the fused kernels
``causal_conv3d`` and ``group_norm_silu`` (Triton on CUDA, the PyTorch reference on CPU). Activations are
channels_last_3d from the encoder's and decoder's first conv to their last (convs, GroupNorm+SiLU, residual
adds, the stride-2 downsampling conv and depth-to-time keep the format), so every conv with 128-multiple
channels takes causal_conv3d's FAST path; encode / decode return contiguous tensors as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from opensora_fast.kernels import causal_conv3d, group_norm_silu


@dataclass(frozen=True)
class TemporalVAEConfig:
    """``VAE_Temporal_SD``'s constructor arguments; the defaults are the 1.2 release's."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32

    @property
    def time_downsample_factor(self) -> int:
        return 2 ** sum(bool(d) for d in self.temporal_downsample)


def _as_triple(k) -> tuple[int, int, int]:
    return (k, k, k) if isinstance(k, int) else tuple(k)


class _ConvParams(nn.Module):
    """Holds a Conv3d's parameters under the names nn.Conv3d uses (``weight``, ``bias``)."""

    def __init__(self, cin: int, cout: int, kernel_size: tuple[int, int, int], bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, *kernel_size))
        self.bias = nn.Parameter(torch.empty(cout)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        # nn.Conv3d's default initialisation
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / fan_in**0.5 if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)


class CausalConv3d(nn.Module):
    """Conv3d with all temporal padding at the front (``dilation*(kt-1) + 1 - stride_t`` frames) and
    symmetric zero spatial padding ``k//2``; parameters at ``.conv.weight`` / ``.conv.bias``."""

    def __init__(self, cin: int, cout: int, kernel_size=3, *, stride_t: int = 1, bias: bool = True):
        super().__init__()
        kernel_size = _as_triple(kernel_size)
        if kernel_size[1] % 2 == 0 or kernel_size[2] % 2 == 0:
            raise ValueError(f"kernel_size must have odd height and width, got {kernel_size}")
        self.stride = (stride_t, 1, 1)
        self.conv = _ConvParams(cin, cout, kernel_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.conv.weight, self.conv.bias
        return causal_conv3d(x, w.to(x.dtype), None if b is None else b.to(x.dtype), stride=self.stride)


class GroupNorm(nn.Module):
    """Affine GroupNorm, optionally followed by SiLU in the same fused kernel (``.weight``, ``.bias``)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels={num_channels} is not divisible by num_groups={num_groups}")
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor, silu: bool = True) -> torch.Tensor:
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return group_norm_silu(x, w, b, self.num_groups, eps=self.eps, silu=silu)


class ResBlock(nn.Module):
    """x + conv2(SiLU(GN2(conv1(SiLU(GN1(x)))))), 3x3x3 causal convs without bias; a 1x1x1 causal
    conv ``conv3`` maps the residual when the channel count changes."""

    def __init__(self, cin: int, cout: int, num_groups: int):
        super().__init__()
        self.norm1 = GroupNorm(num_groups, cin)
        self.conv1 = CausalConv3d(cin, cout, 3, bias=False)
        self.norm2 = GroupNorm(num_groups, cout)
        self.conv2 = CausalConv3d(cout, cout, 3, bias=False)
        self.conv3 = CausalConv3d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        return h + (x if self.conv3 is None else self.conv3(x))


def _run_blocks(blocks, x: torch.Tensor, grad_checkpoint: bool) -> torch.Tensor:
    for block in blocks:
        if grad_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


CL = torch.channels_last_3d


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in channels_last_3d (NDHWC in memory), the format every temporal-VAE kernel runs fastest in
    (causal_conv3d's FAST path, group_norm_silu's packed channels-last tiles); no copy when it already is."""
    return x.contiguous(memory_format=CL)


def depth_to_time(x: torch.Tensor, ts: int) -> torch.Tensor:
    """``B (C ts) T H W -> B C (T ts) H W``: channel c*ts + k becomes frame t*ts + k of channel c.

    One copy; the result is channels_last_3d when x is (the temporal VAE's layout), else contiguous."""
    B, Cts, T, H, W = x.shape
    C = Cts // ts
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=CL):
        # memory (B, T, H, W, C, ts) -> (B, T, ts, H, W, C), seen as (B, C, T*ts, H, W)
        y = x.permute(0, 2, 3, 4, 1).reshape(B, T, H, W, C, ts).permute(0, 1, 5, 2, 3, 4)
        return y.reshape(B, T * ts, H, W, C).permute(0, 4, 1, 2, 3)
    return x.reshape(B, C, ts, T, H, W).transpose(2, 3).reshape(B, C, T * ts, H, W)


class Encoder(nn.Module):
    """conv_in -> per level: num_res_blocks ResBlocks, then a stride-2 causal conv where the level
    halves time -> num_res_blocks ResBlocks -> GroupNorm+SiLU -> 1x1x1 conv to 2*latent channels."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        f, g = cfg.filters, cfg.num_groups
        self.conv_in = CausalConv3d(cfg.in_out_channels, f, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = f
        levels = len(cfg.channel_multipliers)
        for i, mult in enumerate(cfg.channel_multipliers):
            cur = f * mult
            self.block_res_blocks.append(
                nn.ModuleList(ResBlock(prev if j == 0 else cur, cur, g) for j in range(cfg.num_res_blocks))
            )
            prev = cur
            if i < levels - 1:
                # the release keeps a parameter-free nn.Identity where a level does not downsample
                down = cfg.temporal_downsample[i]
                self.conv_blocks.append(CausalConv3d(cur, cur, 3, stride_t=2) if down else nn.Identity())
        self.res_blocks = nn.ModuleList(ResBlock(prev, prev, g) for _ in range(cfg.num_res_blocks))
        self.norm1 = GroupNorm(g, prev)
        self.conv2 = CausalConv3d(prev, 2 * cfg.latent_embed_dim, 1)
        self.grad_checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(channels_last(x))
        for i, blocks in enumerate(self.block_res_blocks):
            x = _run_blocks(blocks, x, self.grad_checkpoint)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        x = _run_blocks(self.res_blocks, x, self.grad_checkpoint)
        return self.conv2(self.norm1(x))


class Decoder(nn.Module):
    """conv1 -> num_res_blocks ResBlocks -> per level (deepest first): ResBlocks, then where the
    encoder halved time a 3x3x3 conv to 2x channels and depth-to-time -> GroupNorm+SiLU -> conv_out."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        f, g = cfg.filters, cfg.num_groups
        levels = len(cfg.channel_multipliers)
        top = f * cfg.channel_multipliers[-1]
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, top, 3)
        self.res_blocks = nn.ModuleList(ResBlock(top, top, g) for _ in range(cfg.num_res_blocks))
        blocks, convs = [None] * levels, [None] * (levels - 1)
        prev = top
        for i in reversed(range(levels)):
            cur = f * cfg.channel_multipliers[i]
            blocks[i] = nn.ModuleList(ResBlock(prev if j == 0 else cur, cur, g) for j in range(cfg.num_res_blocks))
            prev = cur
            if i > 0:
                up = cfg.temporal_downsample[i - 1]
                convs[i - 1] = CausalConv3d(cur, cur * 2, 3) if up else nn.Identity()
        self.block_res_blocks = nn.ModuleList(blocks)
        self.conv_blocks = nn.ModuleList(convs)
        self.time_strides = tuple(2 if d else 1 for d in cfg.temporal_downsample)
        self.norm1 = GroupNorm(g, prev)
        self.conv_out = CausalConv3d(prev, cfg.in_out_channels, 3)
        self.grad_checkpoint = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(channels_last(z))
        x = _run_blocks(self.res_blocks, x, self.grad_checkpoint)
        for i in reversed(range(len(self.block_res_blocks))):
            x = _run_blocks(self.block_res_blocks[i], x, self.grad_checkpoint)
            if i > 0 and self.time_strides[i - 1] > 1:
                x = depth_to_time(self.conv_blocks[i - 1](x), self.time_strides[i - 1])
        return self.conv_out(self.norm1(x))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) with logvar clamped to [-30, 20]; mean/logvar (B, C, T, H, W)."""

    def __init__(self, moments: torch.Tensor | None = None, *, mean=None, logvar=None):
        if moments is not None:
            mean, logvar = moments.chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=dev, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over (C, T, H, W): shape (B,)."""
        m, lv = self.mean.float(), self.logvar.float()
        return 0.5 * (m.square() + lv.exp() - 1.0 - lv).sum(dim=(1, 2, 3, 4))

    @staticmethod
    def cat(posteriors: list[DiagonalGaussian], dim: int = 2) -> DiagonalGaussian:
        return DiagonalGaussian(
            mean=torch.cat([p.mean for p in posteriors], dim),
            logvar=torch.cat([p.logvar for p in posteriors], dim),
        )


class VAE_Temporal_SD(nn.Module):  # noqa: N801 (the release's class name)
    """Temporal VAE: encode (B, 4, T, h, w) 2D latents -> posterior over (B, 4, ceil(T/4), h, w)."""

    def __init__(self, cfg: TemporalVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TemporalVAEConfig()
        self.time_downsample_factor = cfg.time_downsample_factor
        self.out_channels = cfg.in_out_channels
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1)
        self.decoder = Decoder(cfg)

    def set_grad_checkpoint(self, enabled: bool = True) -> None:
        self.encoder.grad_checkpoint = self.decoder.grad_checkpoint = enabled

    def time_padding(self, num_frames: int) -> int:
        return (-num_frames) % self.time_downsample_factor

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames + self.time_padding(num_frames)) // self.time_downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, C, T, h, w): zero-pad time at the front to a multiple of 4, encode, quant_conv."""
        x = F.pad(x, (0, 0, 0, 0, self.time_padding(x.shape[2]), 0))
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        return DiagonalGaussian(moments.contiguous())  # 2 * embed_dim channels: a cheap copy

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """z (B, C, t, h, w) -> (B, C, num_frames, h, w): the first time_padding frames are dropped."""
        x = self.decoder(self.post_quant_conv(channels_last(z)))
        return x[:, :, self.time_padding(num_frames) :].contiguous()  # in_out_channels: a cheap copy

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, num_frames=x.shape[2]), posterior, z

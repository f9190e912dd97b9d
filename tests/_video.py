"""Synthetic test video shared by the I/O and VAE tests."""

import torch


def smooth_video(T=24, H=32, W=48, seed=0):
    """(T, 3, H, W) in [-0.8, 0.8]: moving sinusoids (compresses well, so a round trip is close)."""
    g = torch.Generator().manual_seed(seed)
    ph = torch.rand(3, generator=g) * 6.28
    t = torch.linspace(0, 1, T)[:, None, None]
    y = torch.linspace(-1, 1, H)[None, :, None]
    x = torch.linspace(-1, 1, W)[None, None, :]
    chans = [
        torch.sin(3 * x + 2 * t + y + ph[0]),
        torch.cos(2 * y - 3 * t + ph[1]),
        torch.sin(3 * x * y + t + ph[2]),
    ]
    return 0.8 * torch.stack([c.expand(T, H, W) for c in chans], 1)

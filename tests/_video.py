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


def indexed_video(T, H=16, W=16):
    """(3, T, H, W) flat grey frames whose level encodes the frame index (byte value 16 + 8 k, k < 30), so that a
    decoded frame tells which stored frame it is (``frame_index``) despite lossy compression."""
    if T > 30:
        raise ValueError(f"indexed_video holds at most 30 frames, got T={T}")
    level = (16 + 8 * torch.arange(T).float()) / 127.5 - 1
    return level[None, :, None, None].expand(3, T, H, W).contiguous()


def frame_index(video):
    """The stored frame index of each frame of a decoded (3, T, H, W) ``indexed_video`` (list of ints)."""
    byte = (video.float().mean((0, 2, 3)) + 1) * 127.5
    return [round(v) for v in ((byte - 16) / 8).tolist()]

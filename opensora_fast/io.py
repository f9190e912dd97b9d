"""Video files in and out with PyAV: frames as float tensors in [-1, 1].

``read_video`` -> (T, C, H, W); ``write_video`` takes (C, T, H, W) (the VAE's layout per sample) or
(T, C, H, W). Resizing uses ``torch.nn.functional.interpolate`` (no torchvision).
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F


def _size_pair(size) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive (H, W) or an int, got {size!r}")
    return int(h), int(w)


def resize_center_crop(frames: torch.Tensor, size) -> torch.Tensor:
    """frames (T, C, H, W) float -> (T, C, h, w): scale (bilinear, antialiased when shrinking) so the
    frame covers (h, w), keeping the aspect ratio, then crop the centre."""
    h, w = _size_pair(size)
    H, W = frames.shape[-2:]
    s = max(h / H, w / W)
    nh, nw = max(h, round(H * s)), max(w, round(W * s))
    if (nh, nw) != (H, W):
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=s < 1)
    top, left = (nh - h) // 2, (nw - w) // 2
    return frames[..., top : top + h, left : left + w]


def read_video(path: str, num_frames: int | None = None, fps: float | None = None, size=None) -> torch.Tensor:
    """Decode ``path`` to a float32 (T, 3, H, W) tensor in [-1, 1].

    ``fps`` resamples in time: output frame k is the source frame on screen at time k / fps (frames
    are dropped or repeated). ``num_frames`` keeps the first that many output frames (ValueError if
    the file gives fewer). ``size`` (H, W) or an int (square) resizes to cover and centre-crops.
    Frames are converted one at a time, so memory holds only the frames returned."""
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    frames: list[torch.Tensor] = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        step = 1.0
        if fps is not None:
            src_fps = float(stream.average_rate or stream.guessed_rate or 0)
            if src_fps <= 0 or fps <= 0:
                raise ValueError(f"cannot resample {path!r} (source fps {src_fps}) to fps={fps}")
            step = src_fps / fps
        for i, frame in enumerate(container.decode(stream)):
            # output frame k uses source frame floor(k * step); emit every k that maps to frame i
            x = None
            while int(np.floor(len(frames) * step + 1e-6)) == i:
                x = _to_tensor(frame, size) if x is None else x
                frames.append(x)
                if num_frames is not None and len(frames) == num_frames:
                    break
            if num_frames is not None and len(frames) == num_frames:
                break
    if not frames:
        raise ValueError(f"no frames decoded from {path!r}")
    if num_frames is not None and len(frames) < num_frames:
        raise ValueError(f"{path!r} gives {len(frames)} frames at fps={fps}, fewer than num_frames={num_frames}")
    return torch.stack(frames)


def _to_tensor(frame, size) -> torch.Tensor:
    x = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float()  # (3, H, W) in 0..255
    x = x.div_(127.5).sub_(1.0)
    if size is not None:
        x = resize_center_crop(x[None], size)[0].clamp_(-1, 1)
    return x


def _pick_codec() -> str:
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 (PyAV raises different errors per version for a missing codec)
            continue
    raise RuntimeError("PyAV has neither libx264 nor mpeg4 encoders")


def write_video(path: str, video: torch.Tensor, fps: float, *, crf: int = 18) -> str:
    """Encode ``video`` in [-1, 1], (C, T, H, W) or (T, C, H, W) with C == 3, to an mp4 at ``path``
    (libx264 if PyAV has it, else mpeg4). The file is written next to ``path`` under a temporary name
    and moved into place with os.replace, so readers never see a partial file. Returns ``path``."""
    if not isinstance(video, torch.Tensor) or video.dim() != 4 or 3 not in (video.shape[0], video.shape[1]):
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video must be (3, T, H, W) or (T, 3, H, W), got {shape}")
    if video.shape[1] != 3:  # (C, T, H, W)
        video = video.transpose(0, 1)
    T, _, H, W = video.shape
    if H % 2 or W % 2:
        raise ValueError(f"video height and width must be even for yuv420p, got {(H, W)}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = frames.permute(0, 2, 3, 1).cpu().numpy()  # (T, H, W, 3)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".mp4", dir=directory)
    os.close(fd)
    codec = _pick_codec()
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf)}
            else:
                stream.bit_rate = max(1_000_000, 8 * H * W * int(round(fps)))
            for t in range(T):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frames[t], format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        from opensora_fast.checkpoint import honour_umask

        honour_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


class VideoClipDataset:
    """Map-style dataset over video files for ``train_vae``: item i is the first ``num_frames`` frames
    of ``paths[i]`` (resampled to ``fps`` when given), resized and centre-cropped to ``size``, as a
    (3, T, H, W) float tensor in [-1, 1]."""

    def __init__(self, paths, num_frames: int, size, fps: float | None = None):
        self.paths, self.num_frames, self.size, self.fps = list(paths), num_frames, _size_pair(size), fps
        if not self.paths:
            raise ValueError("paths is empty")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return read_video(self.paths[i], self.num_frames, self.fps, self.size).transpose(0, 1)

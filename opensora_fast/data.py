"""Training data for STDiT3: a CSV of (video path, caption) decoded with PyAV, each clip assigned to a
(T, H, W) bucket and batched only with clips of the same bucket; Open-Sora 1.2's sizes (resolution x
aspect ratio, durations); and the synthetic captioned set of moving shapes that ``opensora-fast demo``
trains on.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------
# Open-Sora 1.2 sizes (opensora/datasets/aspect.py at tag v1.2.0)

# aspect-ratio names are H:W, as in Open-Sora ("9:16" is 240 x 426 at 240p)
_RATIOS = ("3:8", "9:21", "12:25", "1:2", "9:17", "27:50", "9:16", "5:8", "2:3", "3:4", "1:1", "4:3",
           "3:2", "16:9", "17:9", "2:1", "50:27")  # fmt: skip

# (H, W) per ratio, in the order of _RATIOS; Open-Sora's tables (hand-adjusted, so not one formula)
_SIZES = {
    "144p": ((117, 312), (125, 291), (133, 277), (135, 270), (139, 262), (141, 260), (144, 256), (151, 241),
             (156, 234), (166, 221), (192, 192), (221, 165), (235, 156), (256, 144), (263, 139), (271, 135),
             (277, 132)),
    "240p": ((196, 522), (210, 490), (222, 462), (226, 452), (232, 438), (236, 436), (240, 426), (252, 404),
             (262, 393), (276, 368), (320, 320), (370, 278), (392, 262), (426, 240), (440, 232), (452, 226),
             (462, 222)),
    "360p": ((294, 784), (314, 732), (332, 692), (340, 680), (350, 662), (352, 652), (360, 640), (380, 608),
             (392, 588), (416, 554), (480, 480), (554, 416), (588, 392), (640, 360), (660, 350), (678, 340),
             (692, 332)),
    "480p": ((392, 1046), (420, 980), (444, 925), (452, 904), (466, 880), (470, 870), (480, 854), (506, 810),
             (522, 784), (554, 738), (640, 640), (740, 555), (784, 522), (854, 480), (880, 466), (906, 454),
             (924, 444)),
    "720p": ((588, 1568), (628, 1466), (666, 1388), (678, 1356), (698, 1318), (706, 1306), (720, 1280),
             (758, 1212), (784, 1176), (832, 1110), (960, 960), (1108, 832), (1176, 784), (1280, 720),
             (1320, 698), (1358, 680), (1386, 666)),
}  # fmt: skip
RESOLUTIONS = tuple(_SIZES)
ASPECT_RATIOS = _RATIOS

# Open-Sora's NUM_FRAMES_MAP (seconds at 24 fps, rounded to the VAE's 17-frame chunks), plus images
DURATIONS = {"image": 1, "2s": 51, "4s": 102, "8s": 204, "16s": 408}
IMAGE_FPS = 120  # Open-Sora's fps input for single images


def image_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(H, W) in pixels for an Open-Sora resolution name and an H:W aspect-ratio name."""
    if resolution not in _SIZES:
        raise ValueError(f"resolution must be one of {', '.join(RESOLUTIONS)}; got {resolution!r}")
    if aspect_ratio not in _RATIOS:
        raise ValueError(f"aspect ratio must be one of {', '.join(_RATIOS)}; got {aspect_ratio!r}")
    return _SIZES[resolution][_RATIOS.index(aspect_ratio)]


def closest_aspect_ratio(height: float, width: float) -> str:
    """The H:W name whose ratio is nearest to height / width (Open-Sora's get_closest_ratio)."""
    r = height / width
    return min(_RATIOS, key=lambda a: abs(_ratio(a) - r))


def _ratio(name: str) -> float:
    h, w = name.split(":")
    return int(h) / int(w)


def num_frames_for(duration: str) -> int:
    """Frames for a duration name ("image", "2s", "4s", "8s", "16s") or a plain frame count ("17")."""
    if duration in DURATIONS:
        return DURATIONS[duration]
    if duration.isdigit() and int(duration) > 0:
        return int(duration)
    raise ValueError(f"duration must be one of {', '.join(DURATIONS)} or a frame count; got {duration!r}")


def parse_size(text: str) -> tuple[int, int]:
    """ "HxW" -> (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like HxW (e.g. 32x32), got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return h, w


# ---------------------------------------------------------------------------------------------
# CSV + buckets


def read_csv(path: str) -> list[tuple[str, str, int]]:
    """Rows (video path, caption, CSV line number) of a UTF-8 CSV (a byte-order mark is fine) with a header
    naming ``path`` and ``text`` (or ``caption``) columns, as Open-Sora's data CSVs do. Relative paths are
    taken from the CSV's directory. A row without a path or a caption, or a file that is not UTF-8, is a
    ValueError naming the file and the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data CSV {path!r} not found")
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            text_col = "text" if "text" in cols else "caption" if "caption" in cols else None
            if "path" not in cols or text_col is None:
                raise ValueError(f"{path!r} needs a header with 'path' and 'text' (or 'caption') columns, got {cols}")
            for r in reader:
                line = reader.line_num
                if not r["path"]:
                    raise ValueError(f"{path!r} line {line}: no video path")
                if r[text_col] is None or not r[text_col].strip():
                    raise ValueError(f"{path!r} line {line}: no {text_col!r} (every clip needs a caption)")
                rows.append((os.path.join(base, r["path"]), r[text_col], line))
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    except csv.Error as e:
        raise ValueError(f"{path!r}: {e}") from None
    if not rows:
        raise ValueError(f"{path!r} has no rows")
    return rows


class BadClipError(ValueError):
    """A video listed in the data CSV that cannot be read; the message names the file and the CSV line."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    height: int
    width: int
    fps: float


def probe_video(path: str) -> VideoInfo:
    """Frame count, size and frame rate from the container (decodes only if it gives no frame count).
    A file PyAV cannot open, or one without a video stream, is a ValueError naming it."""
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path!r} (listed in the data CSV) not found")
    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise ValueError(f"{path!r} has no video stream")
            s = c.streams.video[0]
            n = s.frames or sum(1 for _ in c.decode(s))
            fps = float(s.average_rate or s.guessed_rate or 0) or 24.0
            h, w = s.codec_context.height, s.codec_context.width
    except av.FFmpegError as e:
        raise ValueError(f"{path!r} cannot be read: {_av_message(e)}") from None
    if n < 1 or h < 1 or w < 1:
        raise ValueError(f"{path!r} has no decodable frames ({n} frames of {h}x{w})")
    return VideoInfo(int(n), h, w, fps)


def _av_message(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def parse_buckets(text: str) -> list[tuple[int, int, int]]:
    """ "17x32x32,9x32x32" -> [(17, 32, 32), (9, 32, 32)] (frames x height x width)."""
    out = []
    for part in text.split(","):
        try:
            t, h, w = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"buckets must look like TxHxW[,TxHxW...], got {text!r}") from None
        if min(t, h, w) < 1:
            raise ValueError(f"bucket sizes must be positive, got {part!r}")
        out.append((t, h, w))
    return out


class VideoTextDataset:
    """Clips from a CSV of (path, caption), each in one (T, H, W) bucket.

    A clip goes to the bucket whose H/W is nearest its own aspect ratio among those with T no longer
    than the clip (at ``fps`` when given), preferring more frames, then more pixels; clips shorter than
    every bucket are dropped (``dropped`` lists them), and files that cannot be opened or have no video
    stream are left out (``bad`` lists (path, CSV line, reason)). Item i is {"video": (3, T, H, W) in
    [-1, 1], "text": caption, "fps": frame rate}: the first T frames, resized to cover (H, W) and
    centre-cropped; a clip that fails to decode raises BadClipError naming the file and CSV line.
    """

    def __init__(self, csv_path: str, buckets: list[tuple[int, int, int]], fps: float | None = None):
        if not buckets:
            raise ValueError("at least one (T, H, W) bucket is needed")
        self.fps = fps
        self.csv_path = csv_path
        self.items: list[tuple[str, str, tuple[int, int, int], float]] = []
        self.lines: list[int] = []  # CSV line of each item
        self.dropped: list[str] = []
        self.bad: list[tuple[str, int, str]] = []
        for path, text, line in read_csv(csv_path):
            try:
                info = probe_video(path)
            except ValueError as e:
                self.bad.append((path, line, str(e)))
                continue
            avail = info.frames if fps is None else int(math.floor((info.frames - 1) * fps / info.fps + 1e-6)) + 1
            fits = [b for b in buckets if b[0] <= avail]
            if not fits:
                self.dropped.append(path)
                continue
            r = info.height / info.width
            best = min(fits, key=lambda b: (abs(b[1] / b[2] - r), -b[0], -b[1] * b[2]))
            self.items.append((path, text, best, float(fps or info.fps)))
            self.lines.append(line)
        if not self.items:
            why = f" ({len(self.bad)} unreadable: {self.bad[0][2]} ...)" if self.bad else ""
            raise ValueError(f"no clip in {csv_path!r} is long enough for any bucket {buckets}{why}")

    def __len__(self) -> int:
        return len(self.items)

    def bucket(self, i: int) -> tuple[int, int, int]:
        return self.items[i][2]

    def describe(self, i: int) -> str:
        return f"{self.items[i][0]!r} ({self.csv_path} line {self.lines[i]})"

    def __getitem__(self, i: int) -> dict:
        import av

        from opensora_fast.io import read_video

        path, text, (t, h, w), fps = self.items[i]
        try:
            video = read_video(path, num_frames=t, fps=self.fps, size=(h, w)).transpose(0, 1)
        except (av.FFmpegError, ValueError, OSError) as e:
            raise BadClipError(f"clip {self.describe(i)} failed to decode: {_av_message(e)}") from None
        return {"video": video, "text": text, "fps": fps}


def bucket_batches(dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> Iterator[list[int]]:
    """Endless batches of dataset indices, every batch from one bucket (``dataset.bucket(i)``).

    Per epoch: each bucket's indices are shuffled and cut into full batches (the remainder waits for
    the next epoch's shuffle), then the batches of all buckets are shuffled together; everything is
    seeded by (seed, epoch), so the order is the same on every run and every rank. With several ranks,
    rank r takes batches r, r + world_size, ... of each epoch (whole rounds only)."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(dataset)):
        groups.setdefault(tuple(dataset.bucket(i)), []).append(i)
    if all(len(g) < batch_size for g in groups.values()):
        raise ValueError(
            f"no bucket holds batch_size={batch_size} clips (bucket sizes: "
            + ", ".join(f"{k}: {len(v)}" for k, v in sorted(groups.items()))
            + ")"
        )
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        batches = []
        for key in sorted(groups):
            idx = groups[key]
            perm = torch.randperm(len(idx), generator=g).tolist()
            batches += [
                [idx[j] for j in perm[k : k + batch_size]] for k in range(0, len(idx) - batch_size + 1, batch_size)
            ]
        order = torch.randperm(len(batches), generator=g).tolist()
        rounds = len(order) // world_size
        if rounds == 0:
            raise ValueError(f"{len(order)} batches per epoch is fewer than world_size={world_size}")
        for k in range(rounds):
            yield batches[order[k * world_size + rank]]
        epoch += 1


# ---------------------------------------------------------------------------------------------
# the synthetic set of the demo

COLORS = {
    "red": (1.0, -0.8, -0.8),
    "green": (-0.8, 0.8, -0.8),
    "blue": (-0.8, -0.6, 1.0),
    "yellow": (1.0, 0.9, -0.8),
}
SHAPES = ("square", "circle")
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
BACKGROUND = (0.6, 0.6, 0.6)  # plain light grey


def synthetic_caption(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def synthetic_clip(
    color: str, shape: str, direction: str, num_frames: int, size: tuple[int, int], offset: float = 0.0
) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1]: a shape of side 1/3 of the frame crossing the middle of a plain
    background in ``direction``, moving 1/2 of the frame over the clip; ``offset`` (in frame units)
    shifts the path sideways. Edges are anti-aliased over one pixel."""
    H, W = size
    side = min(H, W) / 3
    dy, dx = DIRECTIONS[direction]
    s = torch.linspace(-0.25, 0.25, num_frames) if num_frames > 1 else torch.zeros(1)
    cy = (0.5 + dy * s + abs(dx) * offset) * H  # (T,)
    cx = (0.5 + dx * s + abs(dy) * offset) * W
    y = torch.arange(H).float()[None, :, None] + 0.5
    x = torch.arange(W).float()[None, None, :] + 0.5
    ry, rx = y - cy[:, None, None], x - cx[:, None, None]
    if shape == "square":
        d = torch.maximum(ry.abs(), rx.abs()) - side / 2
    elif shape == "circle":
        d = (ry**2 + rx**2).sqrt() - side / 2
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    alpha = (0.5 - d).clamp(0, 1)  # (T, H, W): 1 inside, a one-pixel ramp at the edge
    fg = torch.tensor(COLORS[color])[:, None, None, None]
    bg = torch.tensor(BACKGROUND)[:, None, None, None]
    return bg + (fg - bg) * alpha[None]


def make_synthetic_dataset(
    out_dir: str,
    num_frames: int = 17,
    size: tuple[int, int] = (32, 32),
    fps: int = 8,
    offsets: tuple[float, ...] = (0.0,),
    colors: tuple[str, ...] = tuple(COLORS),
    shapes: tuple[str, ...] = SHAPES,
    directions: tuple[str, ...] = tuple(DIRECTIONS),
) -> str:
    """Write one mp4 per (color, shape, direction, offset) under ``out_dir/videos`` and
    ``out_dir/data.csv`` (columns path, text); returns the CSV path."""
    from opensora_fast.io import write_video

    vid_dir = os.path.join(out_dir, "videos")
    os.makedirs(vid_dir, exist_ok=True)
    rows = []
    for c in colors:
        for sh in shapes:
            for d in directions:
                for k, off in enumerate(offsets):
                    name = f"{c}_{sh}_{d}_{k}.mp4"
                    write_video(os.path.join(vid_dir, name), synthetic_clip(c, sh, d, num_frames, size, off), fps)
                    rows.append((os.path.join("videos", name), synthetic_caption(c, sh, d)))
    path = os.path.join(out_dir, "data.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text"])
        w.writerows(rows)
    return path

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
    """Clips from a CSV of (path, caption), each in one (T, H, W) bucket, with Open-Sora's random temporal crop.

    A clip takes T frames every ``frame_interval`` frames, a window of (T - 1) x frame_interval + 1 frames (at
    ``fps`` when given, else as stored). It goes to the bucket whose H/W is nearest its own aspect ratio among
    those whose window fits the clip, preferring more frames, then more pixels. Clips shorter than every window
    are left out and named (``left_out``: (path, reason); ``dropped``: their paths); files that cannot be opened
    or have no video stream are left out too (``bad``: (path, CSV line, reason)).

    Items are fetched by key ``(i, T, H, W, start)``: the window from frame ``start`` (``crop_key`` draws it,
    seeded by (seed, epoch, clip), and ``bucket_batches`` yields such keys), resized to cover (H, W) and
    centre-cropped; a plain index ``i`` is the window at frame 0 (evaluation, fixed inputs). An item is
    {"video": (3, T, H, W) in [-1, 1], "text": caption, "fps": frame rate / frame_interval, or 120 for a
    single frame as in Open-Sora}; a clip that fails to decode raises BadClipError naming the file and CSV line.
    (Open-Sora's crop takes ``linspace(start, start + T * interval - 1, T)``, a stride slightly above the
    interval; here the stride is exactly ``frame_interval``, as in ``BucketConfigDataset``.)
    """

    def __init__(
        self, csv_path: str, buckets: list[tuple[int, int, int]], fps: float | None = None, frame_interval: int = 1
    ):
        if not buckets:
            raise ValueError("at least one (T, H, W) bucket is needed")
        if frame_interval < 1:
            raise ValueError(f"frame_interval must be >= 1, got {frame_interval}")
        self.buckets = [tuple(b) for b in buckets]
        self.fps, self.frame_interval = fps, frame_interval
        self.csv_path = csv_path
        self.items: list[tuple[str, str, tuple[int, int, int], float]] = []  # path, caption, bucket, frame rate
        self.lines: list[int] = []  # CSV line of each item
        self.frames: list[int] = []  # frames each item has (at ``fps`` when given)
        self.src_fps: list[float] = []  # each item's stored frame rate
        self.left_out: list[tuple[str, str]] = []  # (path, reason)
        self.dropped: list[str] = []  # the paths of left_out
        self.bad: list[tuple[str, int, str]] = []
        shortest = min(b[0] for b in self.buckets)
        for path, text, line in read_csv(csv_path):
            try:
                info = probe_video(path)
            except ValueError as e:
                self.bad.append((path, line, str(e)))
                continue
            avail = info.frames if fps is None else int(math.floor((info.frames - 1) * fps / info.fps + 1e-6)) + 1
            fits = [b for b in self.buckets if self.window(b[0]) <= avail]
            if not fits:
                at = "" if fps is None else f" at {fps:g} fps"
                why = (f"{avail} frame(s){at}, fewer than the {self.window(shortest)} the shortest bucket's window "
                       f"takes ({shortest} frames, frame interval {frame_interval})")  # fmt: skip
                self.left_out.append((path, why))
                self.dropped.append(path)
                continue
            r = info.height / info.width
            best = min(fits, key=lambda b: (abs(b[1] / b[2] - r), -b[0], -b[1] * b[2]))
            self.items.append((path, text, best, float(fps or info.fps)))
            self.lines.append(line)
            self.frames.append(avail)
            self.src_fps.append(info.fps)
        if not self.items:
            why = f" ({len(self.bad)} unreadable: {self.bad[0][2]} ...)" if self.bad else ""
            raise ValueError(f"no clip in {csv_path!r} is long enough for any bucket {self.buckets}{why}")

    def __len__(self) -> int:
        return len(self.items)

    def window(self, t: int) -> int:
        """Frames a crop of ``t`` frames spans: (t - 1) x frame_interval + 1."""
        return (t - 1) * self.frame_interval + 1

    def bucket(self, i: int) -> tuple[int, int, int]:
        return self.items[i][2]

    def describe(self, i: int) -> str:
        return f"{self.items[i][0]!r} ({self.csv_path} line {self.lines[i]})"

    def crop_key(self, i: int, seed: int, epoch: int) -> tuple[int, int, int, int, int]:
        """The key ``(i, T, H, W, start)`` of clip i in ``epoch``: ``start`` uniform over every window that fits,
        from a generator seeded by (seed, epoch, i) (as ``BucketSampler``), so the same on every run and rank."""
        import numpy as np

        t, h, w = self.items[i][2]
        room = self.frames[i] - self.window(t)
        return i, t, h, w, int(np.random.default_rng([seed, epoch, i]).integers(0, room + 1))

    def item_fps(self, i: int) -> float:
        """The model's fps input for clip i: 120 for a single frame (Open-Sora's images), else the clip's frame
        rate / frame_interval."""
        return float(IMAGE_FPS) if self.items[i][2][0] == 1 else self.items[i][3] / self.frame_interval

    def __getitem__(self, key) -> dict:
        import av

        if isinstance(key, int):
            i, (t, h, w), start = key, self.items[key][2], 0
        else:
            i, t, h, w, start = key
        if start < 0 or start + self.window(t) > self.frames[i]:
            last = start + self.window(t) - 1
            raise ValueError(
                f"key {key}: frames {start}..{last} are outside clip {self.describe(i)} ({self.frames[i]})"
            )
        path, text, _, _ = self.items[i]
        idx = [start + k * self.frame_interval for k in range(t)]
        if self.fps is not None:  # output frame k is the stored frame on screen at time k / fps (io.read_video)
            step = self.src_fps[i] / self.fps
            idx = [int(math.floor(k * step + 1e-6)) for k in idx]
        try:
            video = read_frames(path, idx, (h, w))
        except (av.FFmpegError, ValueError, OSError) as e:
            raise BadClipError(f"clip {self.describe(i)} failed to decode: {_av_message(e)}") from None
        return {"video": video.transpose(0, 1), "text": text, "fps": self.item_fps(i)}


def bucket_batches(dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                   accum: int = 1) -> Iterator[list[int]]:  # fmt: skip
    """Endless batches of item keys, every batch from one bucket (``dataset.bucket(i)``): dataset indices, or for a
    dataset with a random temporal crop (``crop_key``, as ``VideoTextDataset``) the keys ``(i, T, H, W, start)``
    its crop draws for (seed, epoch, i). A dataset whose buckets carry their own batch size
    (``bucket_batch_size(i)``, as features extracted from an Open-Sora bucket_config) gets batches of that size
    times ``accum`` in those buckets; the others ``batch_size``.

    Per epoch: each bucket's indices are shuffled and cut into full batches (the remainder waits for
    the next epoch's shuffle; a bucket with fewer clips than ``batch_size`` fills one batch with its clips
    repeated, as ``BucketSampler`` does, so that no bucket is never drawn), then the batches of all buckets are
    shuffled together; everything is
    seeded by (seed, epoch), so the order is the same on every run and every rank. With several ranks,
    rank r takes batches r, r + world_size, ... of each epoch (whole rounds only)."""
    crop = getattr(dataset, "crop_key", None)
    sized = getattr(dataset, "bucket_batch_size", None)
    groups: dict[tuple, list[int]] = {}
    for i in range(len(dataset)):
        groups.setdefault(tuple(dataset.bucket(i)), []).append(i)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        batches = []
        for key in sorted(groups):
            idx = groups[key]
            bs = (sized(idx[0]) or 0) * accum if sized is not None else 0
            bs = bs or batch_size
            perm = torch.randperm(len(idx), generator=g).tolist()
            if len(idx) < bs:  # its clips, repeated in the shuffled order
                batches.append([idx[perm[k % len(idx)]] for k in range(bs)])
                continue
            batches += [[idx[j] for j in perm[k : k + bs]] for k in range(0, len(idx) - bs + 1, bs)]
        order = torch.randperm(len(batches), generator=g).tolist()
        rounds = len(order) // world_size
        if rounds == 0:
            raise ValueError(f"{len(order)} batches per epoch is fewer than world_size={world_size}")
        for k in range(rounds):
            b = batches[order[k * world_size + rank]]
            yield b if crop is None else [crop(i, seed, epoch) for i in b]
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Open-Sora's bucket_config: resolution -> {num_frames: (keep probability, batch size)}

# pixel areas of Open-Sora 1.2's resolution names (opensora/datasets/aspect.py)
RESOLUTION_AREAS = {
    "144p": 144 * 256,
    "256": 256 * 256,
    "240p": 240 * 426,
    "360p": 360 * 640,
    "512": 512 * 512,
    "480p": 480 * 854,
    "720p": 720 * 1280,
    "1024": 1024 * 1024,
    "1080p": 1080 * 1920,
    "2048": 2048 * 2048,
}
_FIT = 0.8  # a clip may go to a resolution when it has at least 80% of its pixels (Open-Sora's approx)


def load_bucket_config(src) -> dict[str, dict[int, tuple]]:
    """Open-Sora's ``bucket_config`` from a dict, a JSON file (frame counts as strings are fine) or a Python
    config file as Open-Sora ships them (its module-level ``bucket_config`` is read). Values are (keep
    probability, batch size), the probability a number or a pair (keep probability, probability of trying this
    length); a batch size may be None only with probability 0. A bad entry is a ValueError naming it."""
    where = "bucket_config"
    if isinstance(src, str):
        where = f"bucket_config {src!r}"
        if not os.path.isfile(src):
            raise ValueError(f"{where}: no such file (give a .py config with a bucket_config dict, or a .json)")
        if src.endswith(".json"):
            import json

            with open(src) as f:
                src = json.load(f)
        else:
            import runpy

            ns = runpy.run_path(src)
            if "bucket_config" not in ns:
                raise ValueError(f"{where}: the file defines no bucket_config")
            src = ns["bucket_config"]
    if not isinstance(src, dict) or not src:
        raise ValueError(f"{where} must be a non-empty dict resolution -> {{num_frames: (probability, batch size)}}")
    out: dict[str, dict[int, tuple]] = {}
    for res, frames in src.items():
        if res not in RESOLUTION_AREAS:
            raise ValueError(f"{where}: resolution {res!r} is not one of {', '.join(RESOLUTION_AREAS)}")
        if not isinstance(frames, dict):
            raise ValueError(f"{where}[{res!r}] must be a dict num_frames -> (probability, batch size)")
        out[res] = {}
        for t, v in frames.items():
            try:
                t = int(t)
                prob, bs = v
            except (TypeError, ValueError):
                raise ValueError(f"{where}[{res!r}][{t!r}] must be (probability, batch size), got {v!r}") from None
            probs = tuple(prob) if isinstance(prob, (list, tuple)) else (prob,)
            if t < 1 or len(probs) not in (1, 2) or any(not 0 <= float(q) <= 1 for q in probs):
                raise ValueError(f"{where}[{res!r}][{t}]: probabilities in [0, 1] and num_frames >= 1, got {v!r}")
            if bs is None and float(probs[0]) > 0:
                raise ValueError(f"{where}[{res!r}][{t}]: a batch size is needed with probability {probs[0]}")
            if bs is not None and int(bs) < 1:
                raise ValueError(f"{where}[{res!r}][{t}]: batch size must be >= 1, got {bs}")
            out[res][t] = (tuple(float(q) for q in probs) if len(probs) == 2 else float(probs[0]), bs and int(bs))
    return out


def bucket_hw(resolution: str, height: int, width: int) -> tuple[int, int]:
    """(H, W) of the bucket a height x width clip takes at ``resolution``: the nearest aspect ratio; Open-Sora's
    table for 144p..720p, else the ratio at the resolution's area (rounded to whole pixels)."""
    name = closest_aspect_ratio(height, width)
    if resolution in _SIZES:
        return _SIZES[resolution][_RATIOS.index(name)]
    r, area = _ratio(name), RESOLUTION_AREAS[resolution]
    return round(math.sqrt(area * r)), round(math.sqrt(area / r))


class BucketAssigner:
    """Open-Sora 1.2's bucket choice for a clip of T frames of H x W, given a random stream ``rng`` (a
    ``numpy.random.Generator``): resolutions from the largest the clip fills (>= 80% of its pixels) down; an
    image takes the resolution's 1-frame bucket with its probability; a video the longest length t with
    T > t * frame_interval (a length with a probability pair is tried with the pair's second value), then is
    kept at that resolution with the first probability, else it tries the next smaller resolution. None: the
    clip is left out this epoch. (Open-Sora reseeds a generator per bucket; here the draws are one stream.)"""

    def __init__(self, config, frame_interval: int = 1):
        self.config = load_bucket_config(config)
        if frame_interval < 1:
            raise ValueError(f"frame_interval must be >= 1, got {frame_interval}")
        self.frame_interval = frame_interval
        self.order = sorted(self.config, key=lambda r: -RESOLUTION_AREAS[r])

    def batch_size(self, resolution: str, t: int) -> int:
        return self.config[resolution][t][1]

    def assign(self, T: int, H: int, W: int, rng) -> tuple[str, int] | None:
        for res in self.order:
            if H * W < RESOLUTION_AREAS[res] * _FIT:
                continue
            crit = self.config[res]
            if T == 1:
                if 1 in crit and rng.random() < _keep(crit[1][0]):
                    return res, 1
                continue
            chosen = None
            for t in sorted(crit, reverse=True):
                prob = crit[t][0]
                if isinstance(prob, tuple) and rng.random() > prob[1]:
                    continue
                if t != 1 and T > t * self.frame_interval:
                    chosen = t
                    break
            if chosen is None:
                continue
            keep = _keep(crit[chosen][0])
            if keep >= 1 or rng.random() < keep:
                return res, chosen
        return None

    def never(self, T: int, H: int, W: int) -> str | None:
        """Why no draw can ever place this clip (None: some draw can)."""
        fits = [r for r in self.order if H * W >= RESOLUTION_AREAS[r] * _FIT]
        if not fits:
            smallest = self.order[-1]
            return f"{H}x{W} is smaller than 80% of every resolution in bucket_config (smallest: {smallest})"
        for res in fits:
            for t, (prob, _) in self.config[res].items():
                ok = t == 1 if T == 1 else (t != 1 and T > t * self.frame_interval)
                if ok and _keep(prob) > 0:
                    return None
        what = "an image" if T == 1 else f"{T} frames (frame interval {self.frame_interval})"
        return f"{what} of {H}x{W}: no bucket with a non-zero probability takes it"


def _draw(assigner: BucketAssigner, info: VideoInfo, i: int, seed: int, epoch: int):
    """(resolution, key (i, T, H, W, start)) of clip i (``info``) drawn in ``epoch``, or None (``BucketConfigDataset
    .draw``)."""
    import numpy as np

    rng = np.random.default_rng([seed, epoch, i])
    got = assigner.assign(info.frames, info.height, info.width, rng)
    if got is None:
        return None
    res, t = got
    h, w = bucket_hw(res, info.height, info.width)
    span = (t - 1) * assigner.frame_interval + 1
    return res, (i, t, h, w, int(rng.integers(0, info.frames - span + 1)))


def _keep(prob) -> float:
    return prob[0] if isinstance(prob, tuple) else prob


class BucketConfigDataset:
    """Clips from a CSV of (path, caption) for an Open-Sora ``bucket_config`` (see ``BucketAssigner``).

    The bucket of a clip is drawn anew every epoch (``BucketSampler``); an item is fetched by key
    ``(i, T, H, W, start)``: T frames from frame ``start`` every ``frame_interval`` frames (Open-Sora's random
    temporal crop; ``start`` drawn by the sampler), resized to cover (H, W) and centre-cropped. Images (one
    frame) get fps 120, as in Open-Sora; videos their own fps / frame_interval. ``left_out`` names every clip
    that no draw can place, with the reason; ``bad`` the files that cannot be opened (path, CSV line, reason)."""

    def __init__(self, csv_path: str, bucket_config, frame_interval: int = 1):
        self.assigner = BucketAssigner(bucket_config, frame_interval)
        self.csv_path = csv_path
        self.items: list[tuple[str, str, VideoInfo]] = []
        self.lines: list[int] = []
        self.left_out: list[tuple[str, str]] = []  # (path, reason)
        self.bad: list[tuple[str, int, str]] = []
        for path, text, line in read_csv(csv_path):
            try:
                info = probe_video(path)
            except ValueError as e:
                self.bad.append((path, line, str(e)))
                continue
            why = self.assigner.never(info.frames, info.height, info.width)
            if why is not None:
                self.left_out.append((path, why))
                continue
            self.items.append((path, text, info))
            self.lines.append(line)
        if not self.items:
            why = self.left_out[0][1] if self.left_out else (self.bad[0][2] if self.bad else "")
            raise ValueError(f"no clip in {csv_path!r} fits the bucket_config ({why})")

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, i: int) -> str:
        return f"{self.items[i][0]!r} ({self.csv_path} line {self.lines[i]})"

    def draw(self, i: int, seed: int, epoch: int) -> tuple[str, tuple[int, int, int, int, int]] | None:
        """Clip i's draw in ``epoch`` from a generator seeded by (seed, epoch, i): (resolution, key
        ``(i, T, H, W, start)``), ``start`` uniform over the windows that fit; None: the keep probabilities
        leave the clip out this epoch."""
        return _draw(self.assigner, self.items[i][2], i, seed, epoch)

    def first_draw(self, i: int, seed: int, max_epochs: int = 100_000) -> tuple[int, str, tuple]:
        """(epoch, resolution, key) of the first epoch whose draw places clip i (``draw``): one bucket and crop per
        clip, as for extracting features once. A clip that ``max_epochs`` draws leave out is a ValueError."""
        for epoch in range(max_epochs):
            got = self.draw(i, seed, epoch)
            if got is not None:
                return (epoch, *got)
        raise ValueError(
            f"clip {self.describe(i)}: no bucket drawn in {max_epochs} epochs (keep probabilities too low)"
        )

    def fps(self, i: int) -> float:
        info = self.items[i][2]
        return float(IMAGE_FPS) if info.frames == 1 else info.fps / self.assigner.frame_interval

    def __getitem__(self, key) -> dict:
        import av

        i, t, h, w, start = key
        path, text, _ = self.items[i]
        try:
            video = read_frames(path, [start + k * self.assigner.frame_interval for k in range(t)], (h, w))
        except (av.FFmpegError, ValueError, OSError) as e:
            raise BadClipError(f"clip {self.describe(i)} failed to decode: {_av_message(e)}") from None
        return {"video": video.transpose(0, 1), "text": text, "fps": self.fps(i)}


def read_frames(path: str, indices: list[int], size: tuple[int, int]) -> torch.Tensor:
    """Frames ``indices`` (non-decreasing; a frame may repeat) of ``path`` as (T, 3, H, W) float32 in [-1, 1],
    resized to cover ``size`` and centre-cropped; only those frames are converted."""
    import av

    from opensora_fast.io import resize_center_crop

    want: dict[int, list[int]] = {}
    for n, k in enumerate(indices):
        want.setdefault(k, []).append(n)
    out: list[torch.Tensor | None] = [None] * len(indices)
    with av.open(path) as c:
        for k, frame in enumerate(c.decode(c.streams.video[0])):
            if k in want:
                x = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float().div_(127.5).sub_(1)
                x = resize_center_crop(x[None], size)[0].clamp_(-1, 1)
                for n in want[k]:
                    out[n] = x
            if k >= indices[-1]:
                break
    if any(x is None for x in out):
        got = sum(x is not None for x in out)
        raise ValueError(f"{path!r} gives {got} of the {len(indices)} frames asked for (up to frame {indices[-1]})")
    return torch.stack(out)


class BucketSampler:
    """Endless batches of item keys for a ``BucketConfigDataset``: every epoch each clip draws its bucket and its
    temporal crop (seeded by (seed, epoch, clip), so the same on every run and rank), each bucket's clips are
    shuffled and cut into batches of the bucket's batch size (a last short batch is filled up with clips of the
    same bucket again, so a bucket with fewer clips than its batch size is still drawn), and all batches are
    shuffled together; rank r takes batches r, r + world_size, ... (whole rounds). ``epoch_log`` receives one
    line per epoch naming how many clips the keep probabilities left out that epoch."""

    def __init__(
        self, dataset: BucketConfigDataset, seed: int, rank: int = 0, world_size: int = 1, epoch_log=None, accum=1
    ):
        self.dataset, self.seed, self.rank, self.world = dataset, seed, rank, world_size
        self.epoch_log, self.accum = epoch_log, accum  # accum: batches of accum x the bucket's batch size

    def epoch(self, epoch: int) -> list[list[tuple]]:
        import numpy as np

        a = self.dataset.assigner
        groups: dict[tuple, list[tuple]] = {}
        skipped = 0
        for i, (_, _, info) in enumerate(self.dataset.items):
            got = _draw(a, info, i, self.seed, epoch)
            if got is None:
                skipped += 1
                continue
            res, key = got
            groups.setdefault((res, *key[1:4]), []).append(key)
        if self.epoch_log is not None:
            self.epoch_log(
                f"epoch {epoch}: {skipped} of {len(self.dataset)} clip(s) not drawn by the keep probabilities"
            )
        g = np.random.default_rng([self.seed, epoch, 1 << 30])
        batches = []
        for key in sorted(groups):
            keys = [groups[key][j] for j in g.permutation(len(groups[key]))]
            bs = a.batch_size(key[0], key[1]) * self.accum
            for k in range(0, len(keys), bs):
                b = keys[k : k + bs]
                while len(b) < bs:  # fill a short last batch from the same bucket
                    b = b + keys[: bs - len(b)]
                batches.append(b)
        return [batches[j] for j in g.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[tuple]]:
        epoch, empty = 0, 0
        while True:
            batches = self.epoch(epoch)
            rounds = len(batches) // self.world
            empty = empty + 1 if rounds == 0 else 0
            if empty > 100:
                raise ValueError(f"100 epochs in a row gave fewer batches than world_size={self.world}")
            for k in range(rounds):
                yield batches[k * self.world + self.rank]
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
                    clip = synthetic_clip(c, sh, d, num_frames, size, off)
                    # lossless (crf 0): the same pixels on every run. At crf 18 threaded libx264 encoded one
                    # 17-frame 32x32 clip 45 different ways in 120 runs (43 different decodes), so the demo's
                    # data, and with it its training, differed from run to run at the same --seed
                    write_video(os.path.join(vid_dir, name), clip, fps, crf=0)
                    rows.append((os.path.join("videos", name), synthetic_caption(c, sh, d)))
    path = os.path.join(out_dir, "data.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text"])
        w.writerows(rows)
    return path

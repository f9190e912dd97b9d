"""Open-Sora 1.2 sizes, the synthetic moving-shapes set, CSV reading, buckets and bucketed batches."""

import csv
import os

import pytest
import torch
from _video import frame_index, indexed_video

from opensora_fast import data as D
from opensora_fast.io import write_video


def test_open_sora_sizes():
    # values of Open-Sora v1.2.0's aspect.py tables (H:W names)
    assert D.image_size("240p", "9:16") == (240, 426)
    assert D.image_size("720p", "9:16") == (720, 1280)
    assert D.image_size("720p", "16:9") == (1280, 720)
    assert D.image_size("144p", "1:1") == (192, 192)
    assert D.image_size("480p", "4:3") == (740, 555)
    assert D.image_size("360p", "3:8") == (294, 784)
    assert D.closest_aspect_ratio(720, 1280) == "9:16"
    assert D.closest_aspect_ratio(500, 500) == "1:1"
    with pytest.raises(ValueError, match="resolution must be one of 144p"):
        D.image_size("1080i", "9:16")
    with pytest.raises(ValueError, match="aspect ratio must be one of"):
        D.image_size("240p", "7:5")


def test_durations_and_sizes():
    assert [D.num_frames_for(d) for d in ("image", "2s", "4s", "8s", "16s", "17")] == [
        1,
        51,
        102,
        204,
        408,
        17,
    ]
    for bad in ("3s", "0", "-1", "x"):
        with pytest.raises(ValueError, match="duration must be one of"):
            D.num_frames_for(bad)
    assert D.parse_size("32x48") == (32, 48)
    assert D.parse_buckets("17x32x32, 9x16x32") == [(17, 32, 32), (9, 16, 32)]
    with pytest.raises(ValueError, match="HxW"):
        D.parse_size("32")
    with pytest.raises(ValueError, match="TxHxW"):
        D.parse_buckets("17x32")


def _centroid(clip):
    """Per-frame (y, x) centre of the pixels that differ from the background."""
    bg = torch.tensor(D.BACKGROUND)[:, None, None, None]
    w = (clip - bg).abs().sum(0)  # (T, H, W)
    ys = torch.arange(clip.shape[2]).float()[None, :, None]
    xs = torch.arange(clip.shape[3]).float()[None, None, :]
    n = w.sum((1, 2))
    return (w * ys).sum((1, 2)) / n, (w * xs).sum((1, 2)) / n


@pytest.mark.parametrize("direction,axis,sign", [("right", 1, 1), ("left", 1, -1), ("down", 0, 1), ("up", 0, -1)])
def test_synthetic_clip_moves_as_captioned(direction, axis, sign):
    clip = D.synthetic_clip("red", "square", direction, 9, (24, 32))
    assert clip.shape == (3, 9, 24, 32) and clip.min() >= -1 and clip.max() <= 1
    c = _centroid(clip)
    moved, still = c[axis][-1] - c[axis][0], c[1 - axis][-1] - c[1 - axis][0]
    size = clip.shape[2 + axis]
    assert sign * moved == pytest.approx(size / 2, rel=0.1)  # half the frame over the clip
    assert abs(still) < 0.1
    # the object has the caption's colour
    centre = clip[:, 0, int(c[0][0]), int(c[1][0])]
    assert torch.allclose(centre, torch.tensor(D.COLORS["red"]))


def test_circle_and_square_areas():
    sq = D.synthetic_clip("blue", "square", "up", 1, (30, 30))
    ci = D.synthetic_clip("blue", "circle", "up", 1, (30, 30))
    bg = torch.tensor(D.BACKGROUND)[:, None, None, None]
    w_sq, w_ci = (sq - bg).abs().sum(0), (ci - bg).abs().sum(0)
    a_sq, a_ci = (w_sq.sum() / w_sq.max()).item(), (w_ci.sum() / w_ci.max()).item()  # anti-aliased areas
    assert a_sq == pytest.approx(100, rel=0.02)  # side 10
    assert a_ci == pytest.approx(torch.pi * 25, rel=0.02)  # radius 5
    with pytest.raises(ValueError, match="shape must be one of"):
        D.synthetic_clip("blue", "star", "up", 1, (30, 30))


def test_synthetic_dataset_files(tmp_path):
    path = D.make_synthetic_dataset(str(tmp_path), 9, (16, 16), 8, colors=("red", "green"), directions=("up",))
    rows = D.read_csv(path)
    assert len(rows) == 4 and {r[1] for r in rows} == {
        "a red square moving up",
        "a red circle moving up",
        "a green square moving up",
        "a green circle moving up",
    }
    info = D.probe_video(rows[0][0])
    assert (info.frames, info.height, info.width, info.fps) == (9, 16, 16, 8.0)


def test_synthetic_dataset_is_the_same_on_every_run(tmp_path):
    """The synthetic clips are written losslessly, so every run decodes to the same pixels (the demo's --seed
    reproduces its data): 6 runs of the same clips give byte-identical files, and each decodes to its
    clip up to the yuv420p round trip. At crf 18, threaded libx264 wrote one such clip 45 different ways
    in 120 runs."""
    from opensora_fast.io import read_video

    kw = dict(colors=("green",), shapes=("circle",), directions=("left",), offsets=(0.12,))
    files = []
    for run in range(6):
        path = D.make_synthetic_dataset(str(tmp_path / str(run)), 17, (32, 32), 8, **kw)
        rel = D.read_csv(path)[0][0]
        with open(rel, "rb") as f:
            files.append(f.read())
    assert all(b == files[0] for b in files)
    clip = D.synthetic_clip("green", "circle", "left", 17, (32, 32), 0.12)
    got = read_video(rel).float()
    want = ((clip.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    if want.shape[1] != 3:
        want = want.transpose(0, 1)
    # chroma subsampling blurs the edge between the circle and the grey: only there may pixels differ
    assert (got - want).abs().mean() < 0.05


def _write_csv(tmp_path, specs):
    """specs: (name, frames, H, W) -> mp4s + a CSV; returns the CSV path."""
    rows = []
    for name, t, h, w in specs:
        write_video(str(tmp_path / f"{name}.mp4"), torch.rand(3, t, h, w) * 2 - 1, fps=8)
        rows.append((f"{name}.mp4", f"caption {name}"))
    p = tmp_path / "d.csv"
    with open(p, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["path", "text"])
        wr.writerows(rows)
    return str(p)


def test_buckets_and_batches(tmp_path):
    specs = [(f"sq{i}", 9, 16, 16) for i in range(5)] + [(f"wide{i}", 12, 16, 32) for i in range(3)]
    specs += [("long", 17, 16, 16), ("short", 4, 16, 16)]
    path = _write_csv(tmp_path, specs)
    buckets = [(9, 16, 16), (9, 16, 32), (17, 16, 16)]
    ds = D.VideoTextDataset(path, buckets)
    assert len(ds) == 9 and ds.dropped == [os.path.join(str(tmp_path), "short.mp4")]
    by_name = {os.path.basename(p): b for p, _, b, _ in ds.items}
    assert by_name["sq0.mp4"] == (9, 16, 16)
    assert by_name["wide0.mp4"] == (9, 16, 32)  # nearest aspect ratio among buckets it is long enough for
    assert by_name["long.mp4"] == (17, 16, 16)  # longest fitting bucket of that aspect ratio
    item = ds[[os.path.basename(p) for p, *_ in ds.items].index("wide1.mp4")]
    assert item["video"].shape == (3, 9, 16, 32) and item["text"] == "caption wide1" and item["fps"] == 8.0

    it = D.bucket_batches(ds, 2, seed=3)
    got = [next(it) for _ in range(12)]
    for b in got:  # keys (i, T, H, W, start) of one bucket, each with a window inside its clip
        assert len(b) == 2 and len({k[1:4] for k in b}) == 1 and all(k[1:4] == ds.bucket(k[0]) for k in b)
        assert all(0 <= k[4] <= ds.frames[k[0]] - k[1] for k in b)
    it2 = D.bucket_batches(ds, 2, seed=3)
    assert [next(it2) for _ in range(12)] == got  # deterministic
    # an epoch has 2 (5 square clips) + 1 (3 wide) full batches; two ranks split each epoch's batches
    r0, r1 = D.bucket_batches(ds, 2, 3, 0, 2), D.bucket_batches(ds, 2, 3, 1, 2)
    e0 = next(r0)
    e1 = next(r1)
    assert not {k[0] for k in e0} & {k[0] for k in e1}
    # a bucket with fewer clips than the batch is drawn too (the one long clip, in a batch of itself twice); with
    # batch_size 6 every bucket fills one batch with its clips repeated, so none is left out of training
    assert any(k[1] == 17 for b in got for k in b)
    it6 = D.bucket_batches(ds, 6, 0)
    epoch = [next(it6) for _ in range(3)]
    by_bucket = {b[0][1:4]: b for b in epoch}
    assert sorted(by_bucket) == sorted(buckets) and all(len(b) == 6 for b in epoch)
    for bucket, b in by_bucket.items():
        clips = [k[0] for k in b]
        assert set(clips) == {i for i in range(len(ds)) if ds.bucket(i) == bucket}
        assert max(clips.count(i) for i in clips) - min(clips.count(i) for i in clips) <= 1  # repeated evenly
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(D.bucket_batches(ds, 0, 0))


def _indexed_csv(tmp_path, specs, fps=8):
    """specs: (name, frames) -> 16 x 16 ``indexed_video`` mp4s (an int) or PNG images (None) + a CSV."""
    from PIL import Image

    with open(tmp_path / "ix.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["path", "text"])
        for name, t in specs:
            if t is None:
                Image.new("RGB", (16, 16), (30, 60, 90)).save(tmp_path / name)
            else:
                write_video(str(tmp_path / name), indexed_video(t), fps=fps)
            wr.writerow([name, f"caption {name}"])
    return str(tmp_path / "ix.csv")


def test_temporal_crop_positions_are_uniform_over_a_long_clip(tmp_path):
    import numpy as np

    seed = int(np.random.default_rng().integers(0, 2**31))  # a fresh seed each run: the crop is uniform for any
    ds = D.VideoTextDataset(_indexed_csv(tmp_path, [("long.mp4", 30)]), [(7, 16, 16)], frame_interval=3)
    assert ds.window(7) == 19 and ds.frames == [30]  # starts 0..11
    n, k = 3600, 12
    starts = [ds.crop_key(0, seed, epoch)[4] for epoch in range(n)]
    counts = np.bincount(starts, minlength=k)
    assert len(counts) == k, f"a start past the last window: {max(starts)} (seed {seed})"
    expect = n / k
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert chi2 < 45.0, (chi2, counts.tolist(), seed)  # 11 degrees of freedom: P(chi2 > 45) < 1e-5
    assert counts.min() > 0.7 * expect, (counts.tolist(), seed)  # every window, the first and the last included
    # bucket_batches gives those keys: with one clip and batches of 1, batch e is epoch e's draw
    it = D.bucket_batches(ds, 1, seed)
    assert [next(it)[0] for _ in range(20)] == [ds.crop_key(0, seed, e) for e in range(20)]


def test_temporal_crop_is_deterministic_and_takes_every_interval_th_frame(tmp_path):
    path = _indexed_csv(tmp_path, [("a.mp4", 30), ("b.mp4", 24)])
    ds = D.VideoTextDataset(path, [(7, 16, 16)], frame_interval=3)
    key = ds.crop_key(1, 11, 4)
    again = D.VideoTextDataset(path, [(7, 16, 16)], frame_interval=3)
    assert again.crop_key(1, 11, 4) == key and key[:4] == (1, 7, 16, 16) and 0 <= key[4] <= 24 - 19
    assert len({ds.crop_key(1, 11, e)[4] for e in range(30)}) > 1  # drawn per epoch
    a, b = ds[key], again[key]
    assert torch.equal(a["video"], b["video"]) and a["video"].shape == (3, 7, 16, 16)
    assert frame_index(a["video"]) == [key[4] + 3 * j for j in range(7)]  # every 3rd frame of the window
    assert a["fps"] == pytest.approx(8 / 3) and a["text"] == "caption b.mp4"
    assert frame_index(ds[0]["video"]) == list(range(0, 19, 3))  # an index: the window at frame 0
    with pytest.raises(ValueError, match=r"frames 6\.\.24 are outside clip '.*b\.mp4'"):
        ds[(1, 7, 16, 16, 6)]
    # resampled to 4 fps (stored frame 2 k is frame k) and to 16 fps (each stored frame twice)
    half = D.VideoTextDataset(path, [(5, 16, 16)], fps=4, frame_interval=2)
    assert half.frames == [15, 12]
    k = half.crop_key(0, 3, 0)
    assert frame_index(half[k]["video"]) == [2 * (k[4] + 2 * j) for j in range(5)] and half[k]["fps"] == 2.0
    double = D.VideoTextDataset(path, [(5, 16, 16)], fps=16)
    k = double.crop_key(0, 3, 1)
    assert frame_index(double[k]["video"]) == [(k[4] + j) // 2 for j in range(5)]


def test_short_clips_are_left_out_by_name_and_images_get_fps_120(tmp_path):
    path = _indexed_csv(tmp_path, [("short.mp4", 12), ("long.mp4", 30), ("img.png", None)])
    ds = D.VideoTextDataset(path, [(7, 16, 16), (1, 16, 16)], frame_interval=2)
    buckets = {os.path.basename(p): b for p, _, b, _ in ds.items}
    assert buckets == {"short.mp4": (1, 16, 16), "long.mp4": (7, 16, 16), "img.png": (1, 16, 16)}
    for i, (p, *_) in enumerate(ds.items):
        item = ds[ds.crop_key(i, 0, 0)]
        assert item["video"].shape[1] == ds.bucket(i)[0]
        assert item["fps"] == (4.0 if p.endswith("long.mp4") else 120.0)  # 8 fps / frame interval 2; single frames
    only7 = D.VideoTextDataset(path, [(7, 16, 16)], frame_interval=2)
    assert [os.path.basename(p) for p, _ in only7.left_out] == ["short.mp4", "img.png"]
    why = dict((os.path.basename(p), r) for p, r in only7.left_out)["short.mp4"]
    assert "12 frame(s)" in why and "fewer than the 13" in why and "frame interval 2" in why
    assert only7.dropped == [p for p, _ in only7.left_out]
    assert [os.path.basename(p) for p, *_ in D.VideoTextDataset(path, [(7, 16, 16)]).items] == ["short.mp4", "long.mp4"]


def test_csv_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data CSV"):
        D.read_csv(str(tmp_path / "none.csv"))
    p = tmp_path / "bad.csv"
    p.write_text("file,caption\na.mp4,x\n")
    with pytest.raises(ValueError, match="'path' and 'text'"):
        D.read_csv(str(p))
    p.write_text("path,caption\nmissing.mp4,x\n")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        D.VideoTextDataset(str(p), [(1, 8, 8)])


def corrupt_stream(path):
    """Overwrite the first NAL length in mdat: the container (and the scan) still reads, decoding fails with
    "Invalid data found when processing input"."""
    data = bytearray(open(path, "rb").read())
    i = data.find(b"mdat")
    assert i > 0
    data[i + 4 : i + 8] = b"\xff\xff\xff\xff"
    open(path, "wb").write(bytes(data))


def write_audio_only(path):
    import numpy as np

    av = pytest.importorskip("av")
    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        for k in range(4):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, k * 1024
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_csv_encodings_and_missing_text(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("path,text\na.mp4,un café\n".encode("utf-8-sig"))
    assert D.read_csv(str(p)) == [(str(tmp_path / "a.mp4"), "un café", 2)]
    p = tmp_path / "latin1.csv"
    p.write_bytes("path,text\na.mp4,un café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv.*not UTF-8"):
        D.read_csv(str(p))
    p = tmp_path / "short.csv"
    p.write_text("path,text\na.mp4,fine\nb.mp4\n")
    with pytest.raises(ValueError, match=r"short\.csv.* line 3: no 'text'"):
        D.read_csv(str(p))


def test_unreadable_clips_are_named_and_left_out(tmp_path):
    """moov lost (truncated) and audio-only files are left out at the scan, each named with its CSV line; a
    clip corrupt inside its stream passes the scan and fails at decode with BadClipError naming file and line."""
    path = _write_csv(tmp_path, [(f"c{i}", 9, 16, 16) for i in range(4)])
    data = open(tmp_path / "c1.mp4", "rb").read()
    open(tmp_path / "c1.mp4", "wb").write(data[: data.find(b"moov") - 4])  # truncated: moov lost
    write_audio_only(str(tmp_path / "c2.mp4"))
    corrupt_stream(str(tmp_path / "c3.mp4"))
    ds = D.VideoTextDataset(path, [(9, 16, 16)])
    assert [os.path.basename(p) for p, *_ in ds.items] == ["c0.mp4", "c3.mp4"]
    assert [(os.path.basename(p), line) for p, line, _ in ds.bad] == [("c1.mp4", 3), ("c2.mp4", 4)]
    assert "cannot be read" in ds.bad[0][2] and "no video stream" in ds.bad[1][2]
    assert ds[0]["video"].shape == (3, 9, 16, 16)
    with pytest.raises(D.BadClipError, match=r"c3\.mp4.*d\.csv line 5.*Invalid data"):
        ds[1]


# ---------------------------------------------------------------------------------------------
# Open-Sora's bucket_config

SMALL_CONFIG = {
    "240p": {1: (0.3, 297), 51: (0.4, 20), 102: ((0.4, 0.33), 10)},
    "144p": {1: (1.0, 475), 51: (1.0, 51), 102: ((1.0, 0.33), 27)},
}


def test_bucket_draw_frequencies_match_the_keep_probabilities():
    import numpy as np

    a = D.BucketAssigner(SMALL_CONFIG)
    n = 20000
    rng = np.random.default_rng(0)
    counts: dict = {}
    for _ in range(n):
        k = a.assign(120, 240, 426, rng)
        counts[k] = counts.get(k, 0) + 1
    # 240p: length 102 tried with p 0.33, kept with 0.4, else 51 kept with 0.4; else down to 144p (always kept)
    expect = {("240p", 102): 0.33 * 0.4, ("240p", 51): 0.67 * 0.4, ("144p", 102): 0.6 * 0.33, ("144p", 51): 0.6 * 0.67}
    assert set(counts) == set(expect)
    for k, p in expect.items():
        se = (p * (1 - p) / n) ** 0.5
        assert abs(counts[k] / n - p) < 4 * se, (k, counts[k] / n, p)
    # images: kept at 240p with 0.3, else at 144p; a 144p-sized clip never goes to 240p
    img = [a.assign(1, 240, 426, rng) for _ in range(n)]
    p240 = sum(k == ("240p", 1) for k in img) / n
    assert abs(p240 - 0.3) < 4 * (0.21 / n) ** 0.5 and all(k in (("240p", 1), ("144p", 1)) for k in img)
    assert {a.assign(60, 144, 256, rng) for _ in range(200)} == {("144p", 51)}  # 60 > 51 only; 102 too long
    # frame interval 2: a clip needs T > t * 2
    assert {D.BucketAssigner(SMALL_CONFIG, 2).assign(60, 144, 256, rng) for _ in range(50)} == {None}


def test_bucket_sampler_batches_per_bucket_sizes_and_fills_small_buckets():

    class Fake:
        assigner = D.BucketAssigner({"144p": {1: (1.0, 4), 17: (1.0, 3)}})
        items = [("v", "t", D.VideoInfo(40, 144, 256, 24.0))] * 5 + [("i", "t", D.VideoInfo(1, 144, 256, 0.0))] * 2

        def __len__(self):
            return len(self.items)

    s = D.BucketSampler(Fake(), seed=3)
    batches = s.epoch(0)
    sizes = sorted((b[0][1], len(b)) for b in batches)
    assert sizes == [(1, 4), (17, 3), (17, 3)]  # the 2 images fill a batch of 4; 5 videos: 3 + (2 + 1 again)
    for b in batches:
        for _i, t, h, w, start in b:
            assert (h, w) == (144, 256) and 0 <= start <= (40 - t if t > 1 else 0)
    assert s.epoch(0) == batches and s.epoch(1) != batches  # seeded by (seed, epoch)
    starts = {k[4] for ep in range(20) for b in s.epoch(ep) for k in b if k[1] == 17}
    assert len(starts) > 5  # a random temporal crop, not the first frames
    r0, r1 = (D.BucketSampler(Fake(), seed=3, rank=r, world_size=2) for r in (0, 1))
    a, b = iter(r0), iter(r1)
    assert next(a) != next(b)


def test_bucket_config_files_and_errors(tmp_path):
    py = tmp_path / "stage.py"
    lines = ['dataset = dict(type="VariableVideoTextDataset")', 'bucket_config = {"240p": {1: (0.5, 8),']
    lines[1] += " 51: ((0.4, 0.3), 2), 102: (0.0, None)}}"
    py.write_text("\n".join(lines) + "\n")
    js = tmp_path / "b.json"
    js.write_text('{"240p": {"1": [0.5, 8], "51": [[0.4, 0.3], 2], "102": [0.0, null]}}')
    assert (
        D.load_bucket_config(str(py))
        == D.load_bucket_config(str(js))
        == {"240p": {1: (0.5, 8), 51: ((0.4, 0.3), 2), 102: (0.0, None)}}
    )
    from opensora_fast.configs import stdit3 as cs

    for c in (cs.STAGE1_BUCKET_CONFIG, cs.STAGE2_BUCKET_CONFIG, cs.STAGE3_BUCKET_CONFIG):
        D.BucketAssigner(c)
    for bad, msg in (
        ({"999p": {1: (1.0, 1)}}, "resolution '999p'"),
        ({"240p": {1: (1.5, 1)}}, "probabilities in"),
        ({"240p": {1: (0.5, None)}}, "a batch size is needed"),
        ({"240p": {1: 0.5}}, "must be \\(probability, batch size\\)"),
    ):
        with pytest.raises(ValueError, match=msg):
            D.load_bucket_config(bad)
    with pytest.raises(ValueError, match="no such file"):
        D.load_bucket_config(str(tmp_path / "none.py"))


def test_bucket_config_dataset_crops_names_what_is_left_out_and_images_get_fps_120(tmp_path):
    from PIL import Image

    video = D.synthetic_clip("red", "square", "right", 30, (36, 64))
    write_video(str(tmp_path / "long.mp4"), video, 10)
    write_video(str(tmp_path / "short.mp4"), D.synthetic_clip("red", "square", "right", 5, (36, 64)), 10)
    write_video(str(tmp_path / "tiny.mp4"), D.synthetic_clip("red", "square", "right", 30, (8, 8)), 10)
    Image.new("RGB", (64, 36), (200, 10, 10)).save(tmp_path / "img.png")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text"])
        for n in ("long.mp4", "short.mp4", "tiny.mp4", "img.png"):
            w.writerow([n, "a clip"])
    cfg = {"144p": {1: (1.0, 2), 9: (1.0, 2)}}
    # 144p needs >= 80% of 144 x 256 pixels: scale the criterion down for these small files
    old = dict(D.RESOLUTION_AREAS)
    try:
        D.RESOLUTION_AREAS["144p"] = 36 * 64
        ds = D.BucketConfigDataset(str(tmp_path / "d.csv"), cfg, frame_interval=2)
        left = dict((os.path.basename(p), why) for p, why in ds.left_out)
        assert set(left) == {"short.mp4", "tiny.mp4"}  # listed by name with the reason
        assert "5 frames" in left["short.mp4"] and "smaller than 80%" in left["tiny.mp4"]
        names = [os.path.basename(p) for p, _, _ in ds.items]
        assert names == ["long.mp4", "img.png"]
        assert ds.fps(1) == 120.0 and ds.fps(0) == 5.0  # 10 fps / frame interval 2
        item = ds[(0, 9, 36, 64, 4)]
        assert item["video"].shape == (3, 9, 36, 64)
        # frames 4, 6, ..., 20 of the written clip (mp4 is lossy: compare loosely)
        ref = video[:, 4:21:2]
        assert (item["video"] - ref).abs().mean() < 0.05
        assert (item["video"] - video[:, 0:9]).abs().mean() > (item["video"] - ref).abs().mean()
    finally:
        D.RESOLUTION_AREAS.clear()
        D.RESOLUTION_AREAS.update(old)

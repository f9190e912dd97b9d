"""Open-Sora 1.2 sizes, the synthetic moving-shapes set, CSV reading, buckets and bucketed batches."""

import csv
import os

import pytest
import torch

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
    for b in got:
        assert len(b) == 2 and len({ds.bucket(i) for i in b}) == 1
    it2 = D.bucket_batches(ds, 2, seed=3)
    assert [next(it2) for _ in range(12)] == got  # deterministic
    # an epoch has 2 (5 square clips) + 1 (3 wide) full batches; two ranks split each epoch's batches
    r0, r1 = D.bucket_batches(ds, 2, 3, 0, 2), D.bucket_batches(ds, 2, 3, 1, 2)
    e0 = next(r0)
    e1 = next(r1)
    assert not set(e0) & set(e1)
    with pytest.raises(ValueError, match="no bucket holds batch_size=6"):
        next(D.bucket_batches(ds, 6, 0))


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

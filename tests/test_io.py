"""opensora_fast.io: mp4 round trips through PyAV, fps resampling, resize + centre crop, atomic writes."""

import os

import pytest
import torch
import torch.nn.functional as F
from _video import smooth_video

av = pytest.importorskip("av")

from opensora_fast import io as vio  # noqa: E402


@pytest.mark.parametrize("layout", ["TCHW", "CTHW"])
def test_round_trip(tmp_path, layout):
    v = smooth_video()
    path = str(tmp_path / "clip.mp4")
    vio.write_video(path, v if layout == "TCHW" else v.transpose(0, 1), fps=24)
    r = vio.read_video(path)
    assert r.shape == v.shape and r.dtype == torch.float32
    assert r.min() >= -1 and r.max() <= 1
    assert (r - v).abs().mean() < 0.06, (r - v).abs().mean()  # lossy codec + yuv420 chroma
    # a different clip is far away: the check above can fail
    assert (r - smooth_video(seed=1)).abs().mean() > 0.2
    with av.open(path) as c:
        assert c.streams.video[0].average_rate == 24
        assert c.streams.video[0].codec_context.name in ("h264", "mpeg4")


def test_fps_resampling_and_num_frames(tmp_path):
    path = str(tmp_path / "clip.mp4")
    vio.write_video(path, smooth_video(T=24), fps=24)
    full = vio.read_video(path)
    half = vio.read_video(path, fps=12)
    assert half.shape[0] == 12
    torch.testing.assert_close(half, full[::2], rtol=0, atol=0)
    double = vio.read_video(path, fps=48, num_frames=9)
    assert double.shape[0] == 9
    torch.testing.assert_close(double, full.repeat_interleave(2, 0)[:9], rtol=0, atol=0)
    third = vio.read_video(path, fps=10)  # frame k at time k/10 -> source floor(2.4 k)
    torch.testing.assert_close(third, full[[0, 2, 4, 7, 9, 12, 14, 16, 19, 21]], rtol=0, atol=0)
    torch.testing.assert_close(vio.read_video(path, num_frames=5), full[:5], rtol=0, atol=0)
    with pytest.raises(ValueError, match="fewer than num_frames"):
        vio.read_video(path, num_frames=25)


def test_resize_center_crop(tmp_path):
    path = str(tmp_path / "clip.mp4")
    vio.write_video(path, smooth_video(H=32, W=48), fps=24)
    full = vio.read_video(path, num_frames=3)
    out = vio.read_video(path, num_frames=3, size=(16, 16))
    # scale 0.5 covers 16x16 with 16x24; crop columns 4..20
    want = F.interpolate(full, size=(16, 24), mode="bilinear", align_corners=False, antialias=True)[..., 4:20]
    torch.testing.assert_close(out, want.clamp(-1, 1), rtol=0, atol=1e-6)
    assert vio.read_video(path, num_frames=2, size=20).shape == (2, 3, 20, 20)
    up = vio.resize_center_crop(full, (40, 40))  # upscale: 32x48 -> 40x60, crop 10 columns each side
    assert up.shape == (3, 3, 40, 40)


def test_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "clip.mp4")
    vio.write_video(path, smooth_video(T=4), fps=8)
    before = open(path, "rb").read()

    def boom(*a, **k):
        raise RuntimeError("encoder failure")

    monkeypatch.setattr(vio.av.VideoFrame, "from_ndarray", boom)
    with pytest.raises(RuntimeError, match="encoder failure"):
        vio.write_video(path, smooth_video(T=4, seed=3), fps=8)
    assert open(path, "rb").read() == before  # the old file is untouched
    assert os.listdir(tmp_path) == ["clip.mp4"]  # no temporary left behind


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="even"):
        vio.write_video(str(tmp_path / "a.mp4"), torch.zeros(2, 3, 15, 16), fps=8)
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        vio.write_video(str(tmp_path / "a.mp4"), torch.zeros(2, 4, 16, 16), fps=8)
    with pytest.raises(FileNotFoundError):
        vio.read_video(str(tmp_path / "missing.mp4"))
    assert os.listdir(tmp_path) == []


def test_video_clip_dataset(tmp_path):
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"c{i}.mp4"))
        vio.write_video(paths[-1], smooth_video(T=10, seed=i), fps=24)
    ds = vio.VideoClipDataset(paths, num_frames=6, size=(16, 16))
    assert len(ds) == 2
    item = ds[1]
    assert item.shape == (3, 6, 16, 16)
    torch.testing.assert_close(item, vio.read_video(paths[1], 6, size=16).transpose(0, 1), rtol=0, atol=0)

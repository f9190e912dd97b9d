"""The memory plan (opensora_fast.memory, ``sample --dry-run``): live-byte tracing on the meta device,
the exact savers (MLP over token chunks, CFG halves in turn, offloading, VAE micro-batches) and the
pre-allocation check."""

import av
import numpy as np
import pytest
import torch
from _tiny import tiny_weights, weight_args

from opensora_fast import cli, memory
from opensora_fast.data import DURATIONS, RESOLUTIONS
from opensora_fast.models.stdit3 import STDiT3, STDiT3Config

pytestmark = pytest.mark.usefixtures("reference_backend")
GiB = memory.GiB


def test_trace_peak_counts_live_tensors_by_storage():
    def fn():
        a = torch.empty(1000, device="meta")  # 4000 B
        v = a.view(10, 100)  # a view: no new bytes
        b = v * 2  # 4000 B, live with a: 8000
        del a, v
        c = b + 1  # a is gone: 8000 again
        d = torch.empty(500, device="meta", dtype=torch.float16)  # 1000 B: 9000
        return c, d

    assert memory.trace_peak(fn) == 9000


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return STDiT3(STDiT3Config.tiny()).eval()


def test_chunked_mlp_same_outputs_same_state_dict():
    m = _tiny_model()
    keys = list(m.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 10, generator=g)
    y = torch.randn(2, 1, 8, 64, generator=g)
    kw = dict(fps=torch.tensor([24.0]), height=torch.tensor([64.0]), width=torch.tensor([80.0]))
    with torch.no_grad():
        a = m(x, torch.tensor([900.0, 100.0]), y, **kw)
        memory.chunk_mlps(m, 7)  # 60 tokens per sample: uneven chunks
        b = m(x, torch.tensor([900.0, 100.0]), y, **kw)
        memory.chunk_mlps(m, 1)
        c = m(x, torch.tensor([900.0, 100.0]), y, **kw)
    assert list(m.state_dict()) == keys
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert torch.equal(c, a)
    with pytest.raises(ValueError, match="chunks must be an int >= 1"):
        memory.chunk_mlps(m, 0)


def test_savers_lower_the_traced_peak():
    kw = dict(dtype="bf16", offload="none")
    base = memory.make_plan(102, (240, 426), **kw)
    dit = {p.name: p for p in base.stages}["denoising step (CFG)"]
    seq = {p.name: p for p in memory.make_plan(102, (240, 426), cfg_sequential=True, **kw).stages}
    chk = {p.name: p for p in memory.make_plan(102, (240, 426), cfg_sequential=True, mlp_chunks=8, **kw).stages}
    assert seq["denoising step (CFG)"].activations < 0.6 * dit.activations
    assert chk["denoising step (CFG)"].activations < seq["denoising step (CFG)"].activations
    assert 1_207_643_972 * 2 <= dit.weights < 1_207_643_972 * 2 * 1.01  # STDiT3-XL/2 in bf16 (+ small buffers)


def test_dry_run_every_resolution_and_duration(capsys):
    """No weights, no GPU: each stage's peak for every resolution x duration; 720p 16 s fits 24 GiB."""
    for res in RESOLUTIONS:
        for dur in DURATIONS:
            rc = cli.main(["sample", "a cat", "--dry-run", "--resolution", res, "--duration", dur, "--offload", "all"])
            out = capsys.readouterr().out
            assert rc == 0, (res, dur)
            for stage in ("T5 encode", "denoising step (CFG)", "VAE decode", "offload:", "peak:"):
                assert stage in out, (res, dur, out)
    assert cli.main(["sample", "a cat", "--dry-run", "--resolution", "720p", "--duration", "16s"]) == 0
    out = capsys.readouterr().out
    peak = float(out.split("peak: ")[1].split(" GiB")[0])
    assert peak <= 24 and "fits in 24.0 GiB" in out, out
    assert "--cfg-sequential" in out  # the batched CFG pair alone needs 26 GiB of activations at 720p 16 s


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return weight_args(tiny_weights(tmp_path_factory.mktemp("weights")))


TINY = ["--image-size", "16x16", "--num-frames", "9", "--steps", "2", "--no-progress"]


def _frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]).astype(int)


def test_real_run_follows_the_plan_with_the_same_clip(weights, tmp_path, capsys, monkeypatch):
    """The savers change no output: the decoded frames (compared before the lossy mp4 encoder, which can
    turn a 1e-6 difference into visible ones) equal those of a run without them."""
    from opensora_fast import sample

    videos = []
    real = sample._write_frames

    def spy(name, video, *args, **kw):
        videos.append(video.clone())
        return real(name, video, *args, **kw)

    monkeypatch.setattr(sample, "_write_frames", spy)
    assert cli.main(["sample", "a red square", *weights, "--out-dir", str(tmp_path / "a"), *TINY]) == 0
    savers = ["--offload", "all", "--cfg-sequential", "--mlp-chunks", "3", "--vae-micro-batch", "1"]
    assert cli.main(["sample", "a red square", *weights, "--out-dir", str(tmp_path / "b"), *TINY, *savers]) == 0
    out = capsys.readouterr().out
    assert "memory plan: peak" in out and "--offload all --cfg-sequential --mlp-chunks 3 --vae-micro-batch 1" in out
    a, b = videos
    assert a.shape == b.shape == (3, 9, 16, 16) and a.std() > 0.05  # not a flat clip
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert _frames(tmp_path / "b" / "000_a_red_square.mp4").shape == (9, 16, 16, 3)


def test_sample_stops_before_allocating_when_the_plan_does_not_fit(weights, tmp_path, capsys):
    rc = cli.main(["sample", "a cat", *weights, "--out-dir", str(tmp_path / "x"), *TINY, "--memory-budget", "1e-6"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "9 frames at 16x16 need" in err and "GiB is --memory-budget" in err and "--dry-run" in err
    assert not (tmp_path / "x").exists()
    # flags given that do not fit, where the plan's own choice would: the error names the flags that fit
    fixed = dict(model=weights[1], vae=weights[3], t5=weights[5], dtype="fp32", t5_dtype="fp32")
    small = memory.make_plan(9, (16, 16), offload="all", cfg_sequential=True, mlp_chunks=4, **fixed)
    big = memory.make_plan(9, (16, 16), offload="none", **fixed)
    assert small.peak < big.peak
    budget = str((small.peak + 1) / GiB)
    rc = cli.main(["sample", "a cat", *weights, "--out-dir", str(tmp_path / "y"), *TINY, "--memory-budget", budget,
                   "--offload", "none"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "these flags would fit" in err and "--offload all" in err, err

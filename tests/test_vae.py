"""OpenSoraVAE: release state-dict names/shapes/counts, latent sizes, streamed encode/decode of a real mp4,
checkpoint round trip and mismatch errors, temporal-VAE semantics, kernel path vs reference path."""

import os

import pytest
import torch
import torch.nn.functional as F
from _close import assert_close_to_fp64
from _video import smooth_video

from opensora_fast.io import read_video, write_video
from opensora_fast.models import OpenSoraVAE, OpenSoraVAEConfig
from opensora_fast.models.vae import SpatialVAEConfig, StateDictMismatchError, num_params
from opensora_fast.models.vae_temporal import (
    CausalConv3d,
    DiagonalGaussian,
    ResBlock,
    TemporalVAEConfig,
    VAE_Temporal_SD,
    channels_last,
    depth_to_time,
)

# Representative keys of hpcai-tech/OpenSora-VAE-v1.2 with their shapes, from reading Open-Sora v1.2.0
# (opensora/models/vae/{vae.py,vae_temporal.py}) and the SDXL AutoencoderKL config.
RELEASE_KEYS = {
    "scale": (1, 4, 1, 1, 1),
    "shift": (1, 4, 1, 1, 1),
    "spatial_vae.module.encoder.conv_in.weight": (128, 3, 3, 3),
    "spatial_vae.module.encoder.down_blocks.3.resnets.1.conv2.weight": (512, 512, 3, 3),
    "spatial_vae.module.encoder.mid_block.attentions.0.to_q.weight": (512, 512),
    "spatial_vae.module.encoder.conv_out.weight": (8, 512, 3, 3),
    "spatial_vae.module.quant_conv.weight": (8, 8, 1, 1),
    "spatial_vae.module.post_quant_conv.weight": (4, 4, 1, 1),
    "spatial_vae.module.decoder.up_blocks.3.resnets.2.conv_shortcut.weight": None,  # absent: 128 -> 128
    "spatial_vae.module.decoder.conv_out.weight": (3, 128, 3, 3),
    "temporal_vae.encoder.conv_in.conv.weight": (128, 4, 3, 3, 3),
    "temporal_vae.encoder.conv_in.conv.bias": None,  # bias=False
    "temporal_vae.encoder.block_res_blocks.0.0.norm1.weight": (128,),
    "temporal_vae.encoder.block_res_blocks.1.0.conv3.conv.weight": (256, 128, 1, 1, 1),
    "temporal_vae.encoder.block_res_blocks.3.0.conv1.conv.weight": (512, 256, 3, 3, 3),
    "temporal_vae.encoder.block_res_blocks.3.3.conv2.conv.weight": (512, 512, 3, 3, 3),
    "temporal_vae.encoder.conv_blocks.0.conv.weight": None,  # level 0 keeps an nn.Identity
    "temporal_vae.encoder.conv_blocks.1.conv.weight": (256, 256, 3, 3, 3),
    "temporal_vae.encoder.conv_blocks.2.conv.bias": (256,),
    "temporal_vae.encoder.res_blocks.3.norm2.bias": (512,),
    "temporal_vae.encoder.norm1.weight": (512,),
    "temporal_vae.encoder.conv2.conv.weight": (8, 512, 1, 1, 1),
    "temporal_vae.quant_conv.conv.weight": (8, 8, 1, 1, 1),
    "temporal_vae.post_quant_conv.conv.weight": (4, 4, 1, 1, 1),
    "temporal_vae.decoder.conv1.conv.weight": (512, 4, 3, 3, 3),
    "temporal_vae.decoder.conv1.conv.bias": (512,),
    "temporal_vae.decoder.res_blocks.0.conv1.conv.weight": (512, 512, 3, 3, 3),
    "temporal_vae.decoder.block_res_blocks.2.0.conv3.conv.weight": (256, 512, 1, 1, 1),
    "temporal_vae.decoder.block_res_blocks.0.0.conv3.conv.weight": (128, 256, 1, 1, 1),
    "temporal_vae.decoder.conv_blocks.2.conv.weight": (1024, 512, 3, 3, 3),
    "temporal_vae.decoder.conv_blocks.1.conv.weight": (512, 256, 3, 3, 3),
    "temporal_vae.decoder.conv_blocks.0.conv.weight": None,
    "temporal_vae.decoder.norm1.weight": (128,),
    "temporal_vae.decoder.conv_out.conv.weight": (4, 128, 3, 3, 3),
    "temporal_vae.decoder.conv_out.conv.bias": (4,),
}


@pytest.fixture(scope="module")
def full_meta():
    with torch.device("meta"):
        return OpenSoraVAE()


def test_release_names_shapes_and_counts(full_meta):
    sd = full_meta.state_dict()
    for key, shape in RELEASE_KEYS.items():
        if shape is None:
            assert key not in sd, key
        else:
            assert key in sd, key
            assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape))
    tv = full_meta.temporal_vae
    enc = num_params(tv.encoder) + num_params(tv.quant_conv)
    dec = num_params(tv.decoder) + num_params(tv.post_quant_conv)
    assert (enc, dec, num_params(tv)) == (144_421_200, 165_265_944, 309_687_144)
    assert num_params(full_meta.spatial_vae) == 83_653_863
    assert sum(k.startswith("temporal_vae.") for k in sd) == 267
    assert len(sd) == 517
    tiny = OpenSoraVAE(OpenSoraVAEConfig.tiny())  # same normalisation as the release (meta has no data)
    assert tiny.scale.flatten().tolist() == pytest.approx([3.85, 2.32, 2.33, 3.06])
    assert tiny.shift.flatten().tolist() == pytest.approx([-0.10, 0.34, 0.27, 0.98])


def test_latent_sizes(full_meta):
    frames = {1: 1, 4: 1, 5: 2, 17: 5, 18: 6, 34: 10, 51: 15, 102: 30, 204: 60, 408: 120}
    for f, t in frames.items():
        assert full_meta.latent_frames(f) == t, f
    assert full_meta.get_latent_size((408, 720, 1280)) == [120, 90, 160]
    assert full_meta.get_latent_size((None, 240, 424)) == [None, 30, 53]


# ------------------------------------------------------------------ tiny models


def tiny_vae(seed=0, **kw) -> OpenSoraVAE:
    torch.manual_seed(seed)
    model = OpenSoraVAE(OpenSoraVAEConfig.tiny(**kw)).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped parameter changes the output
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def mp4_clip(tmp_path_factory):
    """A real 20-frame 16x16 mp4 written and read back with PyAV, as (1, 3, T, H, W)."""
    path = str(tmp_path_factory.mktemp("vid") / "clip.mp4")
    write_video(path, smooth_video(20, 16, 16), fps=24)
    return read_video(path).permute(1, 0, 2, 3)[None]


@pytest.mark.parametrize("T", [17, 20, 1])
def test_encode_decode_real_mp4(mp4_clip, T):
    vae = tiny_vae()
    x = mp4_clip[:, :, :T]
    z = vae.encode(x, sample=False)
    assert z.shape == (1, 4, {17: 5, 20: 6, 1: 1}[T], 8, 8)
    assert torch.isfinite(z).all()
    g = torch.Generator().manual_seed(3)
    zs = vae.encode(x, generator=g)
    assert not torch.equal(zs, z)  # sampling adds noise ...
    torch.testing.assert_close(vae.encode(x, generator=torch.Generator().manual_seed(3)), zs)  # reproducibly
    video = vae.decode(z, num_frames=T)
    assert video.shape == x.shape
    assert video.min() >= -1 and video.max() <= 1 and video.std() > 0
    with pytest.raises(ValueError, match="latent frames"):
        vae.decode(z, num_frames=T + 17)


def test_streaming_equals_whole_clip(mp4_clip):
    """encode/decode stream chunk by chunk into preallocated outputs; the result equals running the
    release's order (whole 2D VAE pass, then per-chunk temporal VAE, then one 2D decode)."""
    vae = tiny_vae(seed=1)
    x = mp4_clip  # 20 frames: chunks of 17 + 3
    z = vae.encode(x, sample=False)
    with torch.no_grad():
        x_z = vae._spatial_encode(x, sample=False)
        zr = torch.cat([vae.temporal_vae.encode(x_z[:, :, i : i + 17]).mode() for i in (0, 17)], 2)
        zr = (zr - vae.shift) / vae.scale
        zz = z * vae.scale + vae.shift
        rec = [vae.temporal_vae.decode(zz[:, :, :5], 17), vae.temporal_vae.decode(zz[:, :, 5:], 3)]
        xr = vae._spatial_decode(torch.cat(rec, 2)).clamp(-1, 1)
    torch.testing.assert_close(z, zr, rtol=1e-5, atol=1e-5)
    out = torch.full((1, 3, 20, 16, 16), float("nan"))
    got = vae.decode(z, 20, out=out)
    assert got is out
    torch.testing.assert_close(out, xr, rtol=1e-5, atol=1e-5)
    starts = [t0 for t0, _ in vae.decode_chunks(z, 20)]
    assert starts == [0, 17]
    # a batch of two: 2D micro-batches straddle the samples, the result is per-sample
    x2 = torch.cat([x, x.flip(-1)])
    z2 = vae.encode(x2, sample=False)
    torch.testing.assert_close(z2[:1], z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z2[1:], vae.encode(x.flip(-1), sample=False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode(z2, 20)[:1], xr, rtol=1e-5, atol=1e-5)
    # spatial tiling: diffusers' blended tiled decode of each frame (8-pixel tiles on 16x16 frames)
    tiled = vae.decode(z, 20, spatial_tile=8)
    m = vae.spatial_vae.module
    with torch.no_grad():
        frames = torch.cat(rec, 2)[0].transpose(0, 1) / vae.cfg.scaling_factor
        want = m.tiled_decode(frames).sample.clamp(-1, 1).transpose(0, 1)[None]
    assert (m.tile_sample_min_size, m.tile_latent_min_size) == (8, 4)
    torch.testing.assert_close(tiled, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tiled, xr, atol=1e-3)  # the tiled path really ran


def test_checkpoint_round_trip_and_formats(tmp_path, mp4_clip):
    vae = tiny_vae(seed=2)
    path = vae.save_pretrained(str(tmp_path / "ckpt"))
    assert path.endswith("model.safetensors")
    cfg = OpenSoraVAEConfig.tiny()
    for src in (str(tmp_path / "ckpt"), path):
        loaded = OpenSoraVAE.from_pretrained(src, cfg).eval()
        for k, v in vae.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    torch.save({"state_dict": vae.state_dict()}, tmp_path / "ckpt.pt")
    loaded = OpenSoraVAE.from_pretrained(str(tmp_path / "ckpt.pt"), cfg, dtype=torch.float64)
    assert loaded.dtype == torch.float64
    z = vae.encode(mp4_clip[:, :, :5], sample=False)
    torch.testing.assert_close(loaded.encode(mp4_clip[:, :, :5].double(), sample=False).float(), z)


def test_checkpoint_mismatch_lists_keys(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in tiny_vae().state_dict().items()}
    del sd["temporal_vae.decoder.conv_out.conv.bias"]
    sd["temporal_vae.extra.weight"] = torch.zeros(2)
    sd["scale"] = torch.ones(4)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(StateDictMismatchError) as info:
        OpenSoraVAE.from_pretrained(str(tmp_path / "bad.safetensors"), OpenSoraVAEConfig.tiny())
    msg = str(info.value)
    assert "1 missing key(s): temporal_vae.decoder.conv_out.conv.bias" in msg
    assert "1 unexpected key(s): temporal_vae.extra.weight" in msg
    assert "1 mis-shaped key(s): scale: checkpoint (4,) vs model (1, 4, 1, 1, 1)" in msg
    with pytest.raises(FileNotFoundError):
        OpenSoraVAE.from_pretrained(str(tmp_path / "nothing"), OpenSoraVAEConfig.tiny())


# ------------------------------------------------------------------ temporal VAE semantics


def test_depth_to_time_layout():
    x = torch.arange(6 * 3).reshape(1, 6, 3, 1, 1).float()  # channels (C=3, ts=2), 3 frames
    y = depth_to_time(x, 2)
    assert y.shape == (1, 3, 6, 1, 1)
    for c in range(3):
        for t in range(3):
            for k in range(2):
                assert y[0, c, 2 * t + k, 0, 0] == x[0, 2 * c + k, t, 0, 0]


def test_resblock_matches_plain_torch():
    torch.manual_seed(0)
    blk = ResBlock(4, 8, num_groups=2).double()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)

    def conv(m, h):  # front time padding kt-1, symmetric spatial k//2, zero padding
        kt, kh, kw = m.conv.weight.shape[2:]
        return F.conv3d(F.pad(h, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)), m.conv.weight)

    h = F.silu(F.group_norm(x, 2, blk.norm1.weight, blk.norm1.bias, 1e-5))
    h = F.silu(F.group_norm(conv(blk.conv1, h), 2, blk.norm2.weight, blk.norm2.bias, 1e-5))
    want = conv(blk.conv2, h) + conv(blk.conv3, x)
    torch.testing.assert_close(blk(x), want)


def test_temporal_vae_shapes_and_causal_conv():
    """GroupNorm pools over time, so only each conv (not the whole VAE) is causal."""
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3, 3).double()
    x = torch.randn(1, 2, 8, 3, 3, dtype=torch.float64)
    y = conv(x)
    x2 = x.clone()
    x2[:, :, 5:] += 1.0
    y2 = conv(x2)
    torch.testing.assert_close(y2[:, :, :5], y[:, :, :5])  # the future does not leak backwards
    assert not torch.allclose(y2[:, :, 5:], y[:, :, 5:])
    down = CausalConv3d(2, 2, 3, stride_t=2)
    assert down(torch.randn(1, 2, 8, 3, 3)).shape == (1, 2, 4, 3, 3)
    tv = VAE_Temporal_SD(TemporalVAEConfig(filters=8, num_res_blocks=1, num_groups=4)).double().eval()
    with torch.no_grad():
        for T, t in ((16, 4), (17, 5), (13, 4), (1, 1)):
            post = tv.encode(torch.randn(1, 4, T, 4, 4, dtype=torch.float64))
            assert post.mean.shape == (1, 4, t, 4, 4) and post.logvar.shape == post.mean.shape
            assert tv.decode(post.mean, T).shape == (1, 4, T, 4, 4)  # front padding dropped again
    moments = torch.cat([torch.zeros(1, 4, 1, 1, 2), torch.tensor([100.0, -100.0]).expand(1, 4, 1, 1, 2)], 1)
    post = DiagonalGaussian(moments)
    assert post.logvar[..., 0].eq(20).all() and post.logvar[..., 1].eq(-30).all()
    assert post.kl().shape == (1,)


# ------------------------------------------------------------------ kernels vs reference


def micro_vae(seed=0) -> OpenSoraVAE:
    torch.manual_seed(seed)
    cfg = OpenSoraVAEConfig(
        spatial=SpatialVAEConfig(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2, sample_size=16),
        temporal=TemporalVAEConfig(filters=4, num_res_blocks=1, num_groups=2),
    )
    return OpenSoraVAE(cfg).eval()


def _kernel_path_vs_reference(monkeypatch, vae, x, dtype):
    """Kernel path vs the same-precision reference path, both judged against the fp64 reference;
    the decode runs on the fp64 latents on every path so only its own error is judged."""

    def run(backend, dt, z=None):
        monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
        m = vae.to(dt)
        return m.encode(x.to(dt), sample=False) if z is None else m.decode(z.to(dt), x.shape[2])

    z_64 = run("reference", torch.float64)
    try:
        z_k = run("triton", dtype)
    except NotImplementedError as e:
        pytest.skip(f"Triton path not available yet: {e}")
    assert_close_to_fp64(z_k, run("reference", dtype), z_64, name="latents")
    v_64 = run("reference", torch.float64, z_64)
    assert_close_to_fp64(run("triton", dtype, z_64), run("reference", dtype, z_64), v_64, name="video")


def test_kernel_path_matches_reference(monkeypatch):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    x = smooth_video(5, 8, 8).permute(1, 0, 2, 3)[None]  # 5 frames -> 2 latent frames of 4x4
    _kernel_path_vs_reference(monkeypatch, micro_vae(), x, torch.float32)


@pytest.mark.gpu
def test_kernel_path_matches_reference_bf16_release_config(monkeypatch):
    """The release architecture (random weights) in bf16 on CUDA: 34 frames at 64x64."""
    torch.manual_seed(0)
    vae = OpenSoraVAE().eval().cuda()
    x = smooth_video(34, 64, 64).permute(1, 0, 2, 3)[None].cuda()
    _kernel_path_vs_reference(monkeypatch, vae, x, torch.bfloat16)


@pytest.mark.gpu
def test_decode_peak_memory_does_not_grow_with_length():
    """Release architecture, bf16, 128x128: decoding 68 frames into a CPU output peaks no higher on
    the GPU than decoding 17 (one temporal chunk and one 2D micro-batch resident at a time)."""
    torch.manual_seed(0)
    vae = OpenSoraVAE().eval().cuda().to(torch.bfloat16)
    peaks = {}
    for frames in (17, 68):
        z = torch.randn(1, 4, vae.latent_frames(frames), 16, 16, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        video = vae.decode(z, frames, out_device="cpu")
        torch.cuda.synchronize()
        peaks[frames] = torch.cuda.max_memory_allocated() - base
        assert video.shape == (1, 3, frames, 128, 128) and video.device.type == "cpu"
    assert peaks[68] <= 1.05 * peaks[17] + 2**20, peaks


def test_save_pretrained_round_trips_the_architecture(tmp_path):
    """A non-release config is restored from the config.json save_pretrained writes, with no cfg given."""
    cfg = OpenSoraVAEConfig.tiny(filters=4)
    vae = OpenSoraVAE(cfg)
    vae.save_pretrained(str(tmp_path / "v"))
    back = OpenSoraVAE.from_pretrained(str(tmp_path / "v"))
    assert back.cfg == cfg
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


def test_mismatch_message_is_bounded(tmp_path):
    """A wrong architecture lists at most 40 names per kind, with the total count."""
    OpenSoraVAE(OpenSoraVAEConfig.tiny(filters=4)).save_pretrained(str(tmp_path / "v"))
    with pytest.raises(StateDictMismatchError, match=r"more\)") as info:
        OpenSoraVAE.from_pretrained(str(tmp_path / "v"), OpenSoraVAEConfig.tiny(filters=8, num_res_blocks=2))
    assert len(str(info.value)) < 20000


# ------------------------------------------------------------------ which kernel variants the model runs


class _LaunchSpy:
    """Records (kernel name, named args) of every autotuned Triton launch, then runs it."""

    def __init__(self, monkeypatch):
        from triton.runtime.autotuner import Autotuner

        self.launches = []
        real = Autotuner.run

        def run(tuner, *args, **kwargs):
            named = {**dict(zip(tuner.arg_names, args)), **kwargs}
            self.launches.append((tuner.base_fn.__name__, named))
            return real(tuner, *args, **kwargs)

        monkeypatch.setattr(Autotuner, "run", run)

    def of(self, prefix):
        return [a for name, a in self.launches if name.startswith(prefix)]


def _interpreter_or_cuda():
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")


def test_temporal_vae_runs_channels_last_fast_path(monkeypatch):
    """The temporal VAE keeps its activations channels_last_3d: every conv whose channels are multiples of
    128 runs causal_conv3d's FAST variant (forward) and every GroupNorm+SiLU the packed channels-last
    layout, including the stride-2 downsampling conv and the conv before depth-to-time; encode and decode
    give the reference path's outputs (fp32 kernels vs fp32 reference, both judged against fp64)."""
    _interpreter_or_cuda()
    torch.manual_seed(0)
    cfg = TemporalVAEConfig(filters=128, num_res_blocks=1, channel_multipliers=(1, 2), temporal_downsample=(True,))
    tv = VAE_Temporal_SD(cfg).eval()
    with torch.no_grad():
        for name, p in tv.named_parameters():
            if "norm" in name:  # GroupNorm weight/bias away from the (1, 0) initialisation
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    x = torch.randn(1, 4, 3, 3, 4, dtype=torch.float64)  # 3 frames: front-padded to 4, 2 latent frames

    def run(backend, dtype, z_in=None):
        """Posterior mean of x, and the decode of z_in (of that mean when None) on one path."""
        monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
        m = tv.to(dtype)
        with torch.no_grad():
            z = m.encode(x.to(dtype)).mean
            return z, m.decode((z if z_in is None else z_in).to(dtype), x.shape[2])

    z_64, v_64 = run("reference", torch.float64)  # each path decodes the fp64 latents: its own error only
    spy = _LaunchSpy(monkeypatch)
    z_k, v_k = run("triton", torch.float32, z_64)
    z_r, v_r = run("reference", torch.float32, z_64)
    convs = spy.of("_causal_conv3d_fwd")
    wide = [a for a in convs if a["c_in"] % 128 == 0 and a["c_out"] % 128 == 0]
    assert len(wide) >= 8 and any(a["STRIDE_T"] == 2 for a in wide)
    assert all(a["FAST"] for a in wide), [(a["c_in"], a["c_out"], a["STRIDE_T"]) for a in wide if not a["FAST"]]
    norms = spy.of("_group_norm_silu_fwd")
    assert len(norms) >= 6 and all(a["LAYOUT"] == 1 for a in norms), [a["LAYOUT"] for a in norms]
    assert_close_to_fp64(z_k, z_r, z_64, name="latent mean")
    assert_close_to_fp64(v_k, v_r, v_64, name="decoded")
    assert z_k.is_contiguous() and v_k.is_contiguous()


def test_spatial_vae_group_norm_silu_matches_diffusers(monkeypatch):
    """The 2D VAE's ResNet GroupNorm + SiLU pairs run on group_norm_silu: encode and decode equal diffusers'
    own AutoencoderKL (same config, same small random weights) in fp32, on the reference path exactly and
    on the kernels within the fp64-judged tolerance; every fused norm launches the kernel."""
    from diffusers.models import AutoencoderKL

    from opensora_fast.models.vae import SpatialVAE
    from opensora_fast.models.vae_temporal import GroupNorm

    _interpreter_or_cuda()
    torch.manual_seed(0)
    cfg = SpatialVAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16)
    ours = SpatialVAE(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    n = 2 * (2 * 2 + 2) + 1  # decoder: 2 up blocks x 2 ResNets + 2 in the mid block, 2 norms each; conv_norm_out
    assert sum(isinstance(m, GroupNorm) for m in ours.module.decoder.modules()) == n
    theirs = AutoencoderKL(**{k: v for k, v in ours.module.config.items() if not k.startswith("_")}).eval()
    assert theirs.load_state_dict(ours.module.state_dict(), strict=True)
    assert not any(isinstance(m, GroupNorm) for m in theirs.modules())
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    z = torch.randn(2, 4, 8, 6, dtype=torch.float64)

    def run(model, dtype):
        m = model.to(dtype)
        with torch.no_grad():
            return m.encode(x.to(dtype)).latent_dist.mode(), m.decode(z.to(dtype)).sample

    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    want_64, want_32 = run(theirs, torch.float64), run(theirs, torch.float32)
    got_ref = run(ours.module, torch.float32)
    for g, w in zip(got_ref, want_32):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "triton")
    spy = _LaunchSpy(monkeypatch)
    got = run(ours.module, torch.float32)
    assert len(spy.of("_group_norm_silu_fwd")) == ours.fused_norms
    for name, g, w32, w64 in zip(("latent mode", "decoded"), got, want_32, want_64):
        assert_close_to_fp64(g, w32, w64, name=name)


def test_temporal_vae_backward_runs_channels_last_fast_path(monkeypatch):
    """Training: the gradients inside the temporal VAE stay channels_last_3d too, so the backward convs
    (dX and dW) of 128-channel layers run the FAST variant and GroupNorm+SiLU's backward the packed
    channels-last layout; gradients match the reference path (fp32 kernels vs fp32 reference vs fp64)."""
    _interpreter_or_cuda()
    torch.manual_seed(0)
    block, down = ResBlock(128, 128, num_groups=32), CausalConv3d(128, 128, 3, stride_t=2)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    x = torch.randn(1, 128, 4, 2, 3, dtype=torch.float64)
    dy = torch.randn(1, 128, 2, 2, 3, dtype=torch.float64)
    params = [*block.parameters(), *down.parameters()]

    def run(backend, dtype):
        monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
        block.to(dtype), down.to(dtype)
        xx = channels_last(x.to(dtype)).requires_grad_()
        y = down(block(xx))
        return (y, *torch.autograd.grad(y, [xx, *params], dy.to(dtype)))

    want = run("reference", torch.float64)
    spy = _LaunchSpy(monkeypatch)
    got = run("triton", torch.float32)
    for kernel in ("_causal_conv3d_fwd", "_causal_conv3d_bwd_dx", "_causal_conv3d_bwd_dw"):
        launches = spy.of(kernel)
        assert len(launches) >= 3 and all(a["FAST"] for a in launches), kernel
    for kernel in ("_group_norm_silu_fwd", "_group_norm_silu_bwd_reduce", "_group_norm_silu_bwd_dx"):
        launches = spy.of(kernel)
        assert len(launches) == 2 and all(a["LAYOUT"] == 1 for a in launches), kernel
    lowp = run("reference", torch.float32)
    for i, (g, lp, w) in enumerate(zip(got, lowp, want)):
        assert_close_to_fp64(g, lp, w, name=f"result {i}", atol=1e-4)

"""Whole Open-Sora 1.2 VAE decode (issue 4): release architecture (``OpenSoraVAEConfig.v1_2()``), random
weights, bf16, batch 1, streaming chunk by chunk (``OpenSoraVAE.decode``).

Shapes: 720p 2 s, latents (4, 15, 90, 160) -> 51 frames of 720x1280 (output on the GPU), and 720p
16 s, latents (4, 120, 90, 160) -> 408 frames with ``out_device="cpu"`` (the video does not sit on the
GPU; the GPU holds one temporal chunk at a time).

Providers: ``opensora_fast`` (the temporal VAE's causal_conv3d and group_norm_silu kernels on
channels_last_3d activations, so its 128-multiple-channel convs run the FAST path, and the 2D VAE's ResNet
GroupNorm + SiLU pairs on group_norm_silu;
``OPENSORA_FAST_BACKEND`` unset on CUDA, forced to "triton" on CPU where the interpreter runs them) and
``reference`` (the same model and weights with ``OPENSORA_FAST_BACKEND=reference``: eager PyTorch).
The variable is set while the model is built and on every call, so the providers cannot leak.
The 2D VAE is diffusers' ``AutoencoderKL`` on both paths; on ``opensora_fast`` its GroupNorm + SiLU
pairs run on group_norm_silu (its convolutions and attention stay cuDNN / SDPA).

Peak memory: ``make`` resets the CUDA peak after building the model, so
``torch.cuda.max_memory_allocated()`` after the timed calls is a decode's peak including the resident
weights and latents; ``test_bench`` records it in ``benchmark.extra_info["peak_mem_bytes"]`` and turns
a CUDA OOM into a skip whose reason starts "OOM".

flops (``decode_flops``): the convolution / matmul / attention flops of the decode as
``torch.utils.flop_counter.FlopCounterMode`` counts them on the meta device (reference path, one
temporal chunk at a time, summed over the clip's chunks). At 720p a 17-frame chunk is 190 TFLOP, of
which the temporal VAE is 18%: the rest is the 2D VAE, whose convolutions are not opensora_fast kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.harness import Case, backend_env, provider_backend, run_case_with_benchmark, settle, suite_params
from opensora_fast.models.vae import OpenSoraVAE, OpenSoraVAEConfig

PROVIDERS = ("opensora_fast", "reference")

# name -> (latent frames, latent H, latent W, pixel frames, output device: None = the GPU)
REAL_SHAPES = {"720p 2s": (15, 90, 160, 51, None), "720p 16s": (120, 90, 160, 408, "cpu")}
# tiny preset (2x spatial, 4x temporal, 4 filters) with 5-frame chunks (2 latent frames) to keep the
# interpreter cheap (~40 kernel launches per chunk): one streamed case, two chunks into a CPU output
TINY_CHUNK = 5
TINY_SHAPES = {"tiny 2 chunks": (4, 4, 4, 10, "cpu")}


@contextlib.contextmanager
def provider(name: str) -> Iterator[None]:
    """OPENSORA_FAST_BACKEND for ``name``, restored on exit."""
    if name not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {name!r}")
    with backend_env(provider_backend(name)):
        yield


@functools.lru_cache(maxsize=4)
def _meta_vae(cfg: OpenSoraVAEConfig) -> OpenSoraVAE:
    with torch.device("meta"):
        return OpenSoraVAE(cfg).eval()


@functools.lru_cache(maxsize=16)
def _chunk_flops(cfg: OpenSoraVAEConfig, t: int, h: int, w: int, frames: int) -> int:
    vae = _meta_vae(cfg)
    with provider("reference"), FlopCounterMode(display=False) as counter:
        vae.decode(torch.empty(1, vae.out_channels, t, h, w, device="meta"), frames)
    return counter.get_total_flops()


def decode_flops(cfg: OpenSoraVAEConfig, t: int, h: int, w: int, frames: int) -> int:
    """Flops of ``OpenSoraVAE.decode`` of latents (1, 4, t, h, w) to ``frames`` frames: the sum over
    its temporal chunks (decode runs chunk by chunk), each counted once per distinct chunk size."""
    mz, m = _meta_vae(cfg).micro_z_frame_size, cfg.micro_frame_size
    total = 0
    for k, i in enumerate(range(0, t, mz)):
        total += _chunk_flops(cfg, min(mz, t - i), h, w, min(m, frames - k * m))
    return total


def _maker(cfg, name, shape, device, dtype):
    t, h, w, frames, out_device = shape

    def make():
        settle()
        with provider(name):
            torch.manual_seed(0)
            with torch.device(device):
                vae = OpenSoraVAE(cfg)
            vae = vae.to(dtype).eval()
            g = torch.Generator().manual_seed(1)
            z = torch.randn(1, vae.out_channels, t, h, w, generator=g).to(device, dtype)
        settle()

        def decode():
            with provider(name):
                return vae.decode(z, frames, out_device=out_device)

        return decode

    return make


def cases(device, dtype, tiny) -> list[Case]:
    if tiny:
        cfg = dataclasses.replace(OpenSoraVAEConfig.tiny(filters=4), micro_frame_size=TINY_CHUNK)
    else:
        cfg = OpenSoraVAEConfig.v1_2()
    f = cfg.spatial.downsample
    out = []
    for label, shape in (TINY_SHAPES if tiny else REAL_SHAPES).items():
        t, h, w, frames, out_device = shape
        name = f"{label} z=4x{t}x{h}x{w} -> {frames}x{h * f}x{w * f} out={out_device or device}"
        flops = decode_flops(cfg, t, h, w, frames)
        for p in PROVIDERS:
            make = _maker(cfg, p, shape, device, dtype)
            dt = str(dtype).removeprefix("torch.")
            out.append(Case("vae_decode", name, p, "fwd", make, flops=flops, dtype=dt))
    return out


@suite_params(cases)
def test_bench(benchmark, case):
    run_case_with_benchmark(benchmark, case)


def test_decode_flops_equal_whole_decode_count():
    """The per-chunk sum equals FlopCounterMode over one whole decode (uneven last chunk included)."""
    cfg = dataclasses.replace(OpenSoraVAEConfig.tiny(filters=4), micro_frame_size=TINY_CHUNK)
    vae = _meta_vae(cfg)
    t, frames = 5, 12  # chunks of 5, 5 and 2 frames
    assert vae.latent_frames(frames) == t
    with provider("reference"), FlopCounterMode(display=False) as counter:
        vae.decode(torch.empty(1, 4, t, 3, 5, device="meta"), frames)
    assert decode_flops(cfg, t, 3, 5, frames) == counter.get_total_flops() > 0

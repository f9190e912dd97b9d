"""Error judging as flash-attention does it: against an fp64 reference, the kernel may be at most
``factor`` times as wrong as the same-precision PyTorch reference, plus a small atol. NaN never passes."""

from __future__ import annotations

import torch


def assert_close_to_fp64(out, ref_lowp, ref_fp64, *, name="output", factor=2.0, atol=None):
    """out: kernel result; ref_lowp: PyTorch reference in out's dtype; ref_fp64: reference in fp64."""
    assert out.shape == ref_fp64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in kernel output (unwritten element or overflow)"
    assert not torch.isnan(ref_fp64).any(), f"{name}: NaN in reference"
    if atol is None:
        atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[out.dtype]
    ref = ref_fp64.double()
    err = (out.double().cpu() - ref.cpu()).abs().max().item()
    base = (ref_lowp.double().cpu() - ref.cpu()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= factor * base + atol * max(1.0, scale), (
        f"{name}: max error {err:.3g} vs fp64 > {factor} x same-precision reference error {base:.3g}"
        f" + atol {atol:g} (max |ref| {scale:.3g})"
    )


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, seed=None):
    g = torch.Generator(device="cpu")
    g.manual_seed(torch.seed() if seed is None else seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

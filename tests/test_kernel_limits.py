"""Launch limits at real video sizes, without running anything: int64 offsets and CUDA grid limits.

The host launchers of the norm / conv kernels (the custom ops' ``_*_impl`` functions) are called on meta
tensors (free at any size) with every Triton launch intercepted (``Autotuner.run`` / ``JITFunction.run``)
instead of executed. At 720p 16 s
(latent 120 x 45 x 80 tokens of 1152 channels; the temporal VAE's 408 2D-latent frames of 90 x 160)
batch 2 fits int32 offsets and batch 5 does not: every launch whose tensors span >= 2**31 elements
must have picked the int64 variant (``I64=True``), and every grid must be within CUDA's limits
(x < 2**31, y and z <= 65535).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from opensora_fast.kernels._record import TensorArg, recording
from triton.runtime.autotuner import Autotuner

# the package re-exports each module's public function under the module's name: import the modules
conv_mod = importlib.import_module("opensora_fast.kernels.causal_conv3d")
gn_mod = importlib.import_module("opensora_fast.kernels.group_norm_silu")
ln_mod = importlib.import_module("opensora_fast.kernels.layernorm_modulate")
qk_mod = importlib.import_module("opensora_fast.kernels.qk_norm_rope")

INT32_MAX = 2**31 - 1
META = torch.device("meta")
BF16 = torch.bfloat16

# 720p 16 s: 408 frames -> 120 latent frames of 90 x 160 latents, patch 2 -> 45 x 80 = 3600 tokens
T_LAT, S_TOK, HIDDEN, HEADS, HEAD_DIM = 120, 3600, 1152, 16, 72
N_TOK = T_LAT * S_TOK
VAE_FRAMES, VAE_H, VAE_W = 408, 90, 160  # 2D-VAE latents of the whole clip (temporal VAE input)


def capture_launches():
    """Record every Triton launch (kernel, arguments, constexprs, grid per autotune config) without running,
    with launch geometry sized for an H200 (``kernels._record.recording``)."""
    return recording()


def _check_launches(rec, expect_i64: bool | None):
    assert rec.launches, "no launch captured"
    for launch in rec.launches:
        name, args, grid = launch.kernel, launch.named(), launch.grid
        tensors = {k: v for k, v in args.items() if isinstance(v, TensorArg)}
        big = [k for k, t in tensors.items() if t.max_offset() >= INT32_MAX]
        if big:
            assert args.get("I64") is True, (
                f"{name}: {big} span >= 2**31 elements but the launch uses int32 offsets (I64={args.get('I64')})"
            )
        if expect_i64 is not None:
            assert bool(big) == expect_i64, f"{name}: expected int64-sized tensors={expect_i64}, got {big}"
        assert 1 <= grid[0] < 2**31, f"{name}: grid x {grid[0]}"
        assert 1 <= grid[1] <= 65535 and 1 <= grid[2] <= 65535, f"{name}: grid {grid}"


def _meta(*shape, dtype=BF16):
    return torch.empty(*shape, dtype=dtype, device=META)


@pytest.mark.parametrize("B", [2, 5])
@pytest.mark.parametrize("variant", ["layernorm_modulate", "add_layernorm_modulate+mask", "gated_residual"])
def test_layernorm_modulate_720p_16s(B, variant):
    x = _meta(B, N_TOK, HIDDEN)
    y = _meta(B, N_TOK, HIDDEN) if variant != "layernorm_modulate" else None
    mod = lambda: _meta(B, HIDDEN)  # noqa: E731
    masked = variant.endswith("+mask")
    has_ln = variant != "gated_residual"
    gate = mod() if y is not None else None
    shift, scale = (mod(), mod()) if has_ln else (None, None)
    shift0, scale0 = (mod(), mod()) if (masked and has_ln) else (None, None)
    gate0 = mod() if (masked and gate is not None) else None
    x_mask = torch.empty(B, T_LAT, dtype=torch.bool, device=META) if masked else None
    with capture_launches() as rec:
        r, h, mean, rstd = ln_mod._fwd_impl(x, y, shift, scale, gate, shift0, scale0, gate0, x_mask, 1e-6, has_ln)
        dh = _meta(B, N_TOK, HIDDEN) if has_ln else None
        dr = _meta(B, N_TOK, HIDDEN) if y is not None else None
        saved = r if (has_ln and y is not None) else x
        ln_mod._bwd_impl(dh, dr, saved, y, scale, gate, scale0, gate0, x_mask, mean, rstd, has_ln)
    assert len(rec.launches) == 2
    _check_launches(rec, expect_i64=B == 5)


@pytest.mark.parametrize("B", [2, 5])
@pytest.mark.parametrize("rope", [False, True])
def test_qk_norm_rope_720p_16s(B, rope):
    q = _meta(B, N_TOK, HEADS, HEAD_DIM)
    w = _meta(HEAD_DIM)
    cos = sin = _meta(N_TOK, HEAD_DIM, dtype=torch.float32) if rope else None
    with capture_launches() as rec:
        out, rstd = qk_mod._fwd_impl(q, w, cos, sin, 1e-6)
        qk_mod._bwd_impl(out, q, w, cos, sin, rstd)
    assert len(rec.launches) == 2
    _check_launches(rec, expect_i64=B == 5)


def _vae_input(B, C, layout):
    x = _meta(B, C, VAE_FRAMES, VAE_H, VAE_W)
    return x.to(memory_format=torch.channels_last_3d) if layout == "channels_last" else x


@pytest.mark.parametrize("B", [2, 5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_silu_720p_16s(B, layout):
    x = _vae_input(B, 128, layout)
    w, b = _meta(128), _meta(128)
    with capture_launches() as rec:
        y, mean, rstd = gn_mod._fwd_impl(x, w, b, 32, 1e-5, True)
        gn_mod._bwd_impl(y, x, w, b, mean, rstd, 32, True)
    assert len(rec.launches) >= 4
    _check_launches(rec, expect_i64=B == 5)


@pytest.mark.parametrize("B", [2, 5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride_t", [1, 2])
def test_causal_conv3d_720p_16s(B, layout, stride_t):
    x = _vae_input(B, 128, layout)
    w = _meta(128, 128, 3, 3, 3)
    bias = _meta(128)
    with capture_launches() as rec:
        y = conv_mod._fwd_impl(x, w, bias, stride_t)
        conv_mod._bwd_dx_impl(y, x, w, stride_t)
        conv_mod._bwd_dw_impl(y, x, w, True, stride_t)
    assert len(rec.launches) >= 3
    _check_launches(rec, expect_i64=B == 5)
    assert any(lc.named().get("FAST") for lc in rec.launches) == (layout == "channels_last")


def test_needs_int64_threshold():
    """The host's int32 proof: the largest element offset, from sizes and strides (views included)."""
    assert not ln_mod.needs_int64(_meta(2, N_TOK, HIDDEN))
    assert ln_mod.needs_int64(_meta(5, N_TOK, HIDDEN))
    assert ln_mod.needs_int64(_meta(1, 2**31))
    assert not ln_mod.needs_int64(_meta(1, 2**31 - 1))
    assert ln_mod.needs_int64(_meta(4, 2**30)[::3])  # a strided view spans more than it holds
    assert not ln_mod.needs_int64(None, _meta(0, 2**40))
    assert 5 * N_TOK * HIDDEN > INT32_MAX  # the batch-5 case really is past int32


# --------------------------------------------------------------------------------------------
# the int64 variants compute the same results (forced on small shapes by lowering the threshold)


def _fwd_bwd(fn, inputs, seed=0):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    torch.autograd.backward(outs, dys)
    return [o.detach() for o in outs] + [t.grad for t in leaves if t.grad is not None]


def _int64_cases():
    from _close import randn
    from opensora_fast.kernels import add_layernorm_modulate, causal_conv3d, group_norm_silu, qk_norm_rope

    B, T, S, C = 2, 3, 5, 40
    mask = torch.tensor([[True, False, True], [False, True, True]])
    cl = torch.channels_last_3d
    return {
        "add_layernorm_modulate+mask": (
            lambda x, y, sh, sc, g, sh0, sc0, g0: add_layernorm_modulate(
                x, y, sh, sc, gate=g, x_mask=mask, shift0=sh0, scale0=sc0, gate0=g0
            ),
            [randn(B, T * S, C, seed=1), randn(B, T * S, C, seed=2)] + [randn(B, C, seed=3 + i) for i in range(6)],
        ),
        "qk_norm_rope": (
            lambda q, k, wq, wk, cos, sin: qk_norm_rope(q, k, wq, wk, cos=cos, sin=sin),
            [
                randn(2, 6, 3, 8, seed=10),
                randn(2, 6, 3, 8, seed=11),
                randn(8, seed=12),
                randn(8, seed=13),
                randn(6, 8, seed=14),
                randn(6, 8, seed=15),
            ],
        ),
        "group_norm_silu,channels_last": (
            lambda x, w, b: group_norm_silu(x, w, b, 4),
            [randn(2, 8, 3, 4, 5, seed=20).to(memory_format=cl), randn(8, seed=21), randn(8, seed=22)],
        ),
        "group_norm_silu,contiguous": (
            lambda x, w, b: group_norm_silu(x, w, b, 4),
            [randn(2, 8, 3, 4, 5, seed=23), randn(8, seed=24), randn(8, seed=25)],
        ),
        "causal_conv3d": (
            lambda x, w, b: causal_conv3d(x, w, b, stride=(2, 1, 1)),
            [randn(1, 5, 6, 3, 4, seed=30), randn(7, 5, 3, 3, 3, seed=31, scale=0.1), randn(7, seed=32)],
        ),
    }


@pytest.mark.parametrize("case", list(_int64_cases()))
def test_int64_variant_same_results(case, monkeypatch):
    """Lowering the int32 limit makes every launch take its I64 variant: results are bit-identical."""
    fn, inputs = _int64_cases()[case]
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "triton")
    seen = []
    real_run = Autotuner.run

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("I64"))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", spy)
    base = _fwd_bwd(fn, inputs)
    assert seen and not any(seen)
    seen.clear()
    monkeypatch.setattr(ln_mod, "INT32_LIMIT", 1)
    forced = _fwd_bwd(fn, inputs)
    assert seen and all(seen), seen
    assert len(base) == len(forced)
    for a, b in zip(base, forced):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# non-finite input and edge cases (issue 13)


def _nan_at(t, idx):
    t = t.clone()
    t[idx] = float("nan")
    return t


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_propagates_nan_only_masked_rows_zero(backend, monkeypatch):
    """NaN in q, k or the norm weights reaches the output (the reference used to zero it with
    nan_to_num); only rows that see no key are zero."""
    from _close import randn
    from opensora_fast.kernels import cross_attention, flash_attn_func, reference, self_attention

    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    q, k, v = (randn(1, 4, 2, 8, seed=s) for s in (1, 2, 3))
    out = flash_attn_func(_nan_at(q, (0, 1, 0, 3)), k, v)
    assert out[0, 1, 0].isnan().all() and not out[0, [0, 2, 3]].isnan().any() and not out[0, :, 1].isnan().any()
    out = flash_attn_func(q, _nan_at(k, (0, 2, 1, 0)), v)
    assert out[:, :, 1].isnan().all() and not out[:, :, 0].isnan().any()
    # causal with more queries than keys (bottom-right aligned): the first rows see no key -> zeros
    ref = reference.attention_ref(q, k[:, :2], v[:, :2], causal=True)
    assert ref[0, :2].eq(0).all() and not ref.isnan().any()
    ref = reference.attention_ref(_nan_at(q, (0, 3, 0, 0)), k[:, :2], v[:, :2], causal=True)
    assert ref[0, :2].eq(0).all() and ref[0, 3, 0].isnan().all() and not ref[0, 2].isnan().any()
    # norm weights: a NaN weight entry poisons every head's q rows
    qkv = randn(1, 6, 3 * 16, seed=4)
    wq, wk = randn(8, seed=5), randn(8, seed=6)
    out = self_attention(qkv, _nan_at(wq, (2,)), wk, num_heads=2, num_frames=2, layout="spatial")
    assert out.isnan().all()
    out = self_attention(qkv, wq, wk, num_heads=2, num_frames=2, layout="spatial")
    assert not out.isnan().any()
    # cross attention: NaN in one sample's kv reaches that sample only; an empty caption gives zeros
    qc, kv = randn(2, 3, 16, seed=7), randn(5, 32, seed=8)
    lens = torch.tensor([2, 3])
    out = cross_attention(qc, _nan_at(kv, (0, 0)), lens, num_heads=2)
    assert out[0, :, :8].isnan().all() and not out[1].isnan().any()
    out = cross_attention(qc, kv[:3], torch.tensor([0, 3]), num_heads=2)
    assert out[0].eq(0).all() and not out[1].isnan().any()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_x_mask_and_zero_input_channels_raise_value_error(backend, monkeypatch):
    """Issue 13: x_mask of shape (B, 0) raised ZeroDivisionError; causal_conv3d with C_in = 0 crashed (Triton)
    or returned C_out = 0 channels (reference). Both are ValueErrors naming the argument now."""
    from _close import randn
    from opensora_fast.kernels import add_layernorm_modulate, causal_conv3d, gated_residual, layernorm_modulate

    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    x, mod = randn(2, 6, 8), randn(2, 8)
    empty_mask = torch.zeros(2, 0, dtype=torch.bool)
    with pytest.raises(ValueError, match="x_mask"):
        layernorm_modulate(x, mod, mod, x_mask=empty_mask, shift0=mod, scale0=mod)
    with pytest.raises(ValueError, match="x_mask"):
        gated_residual(x, x, mod, x_mask=empty_mask, gate0=mod)
    with pytest.raises(ValueError, match="x_mask"):
        add_layernorm_modulate(x, x, mod, mod, x_mask=empty_mask, shift0=mod, scale0=mod)
    with pytest.raises(ValueError, match="weight"):
        causal_conv3d(torch.randn(1, 0, 3, 4, 4), torch.randn(5, 0, 3, 3, 3), torch.randn(5))

"""Open-Sora's CausalConv3d: all temporal padding at the front ((k_t - 1) + (1 - stride_t) frames),
symmetric spatial padding k // 2, then a plain Conv3d with stride (stride_t, 1, 1).

x is (B, C_in, T, H, W) in either contiguous or channels_last_3d memory format; the output has the
same memory format as x.
"""

from __future__ import annotations

import torch

from opensora_fast.kernels import reference
from opensora_fast.kernels._utils import check_tensor, use_triton


def _check(x, weight, bias, stride, padding_mode):
    check_tensor(x, "x", ndim=5)
    check_tensor(weight, "weight", shape=(None, x.shape[1], None, None, None), like=x)
    if bias is not None:
        check_tensor(bias, "bias", shape=(weight.shape[0],), like=x)
    if not (isinstance(stride, (tuple, list)) and len(stride) == 3 and all(isinstance(s, int) for s in stride)):
        raise ValueError(f"stride must be a tuple of 3 ints (stride_t, 1, 1), got {stride!r}")
    if stride[0] < 1 or tuple(stride[1:]) != (1, 1):
        raise ValueError(f"stride must be (stride_t >= 1, 1, 1) (no spatial stride), got {tuple(stride)}")
    if padding_mode not in ("zeros", "constant"):
        raise ValueError(f"padding_mode must be 'zeros' (Open-Sora's constant pad), got {padding_mode!r}")
    kt, kh, kw = weight.shape[2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"weight's spatial kernel must be odd (symmetric padding k//2), got {(kh, kw)}")
    if x.shape[2] < stride[0]:
        raise ValueError(f"x must have at least stride_t={stride[0]} frames, got shape {tuple(x.shape)}")


def causal_conv3d(x, weight, bias=None, *, stride=(1, 1, 1), padding_mode="zeros"):
    """Causal 3D convolution: x (B, C_in, T, H, W), weight (C_out, C_in, k_t, k_h, k_w), bias (C_out,)
    -> (B, C_out, T_out, H, W) with T_out = T // stride_t (for k_t >= stride_t)."""
    _check(x, weight, bias, stride, padding_mode)
    stride = tuple(stride)
    if not use_triton(x, weight, bias):
        return reference.causal_conv3d_ref(x, weight, bias, stride, padding_mode)
    raise NotImplementedError("causal_conv3d: Triton kernels not written yet (CPU reference only)")

"""GroupNorm (affine) with SiLU fused, on video tensors (B, C, T, H, W) or images (B, C, H, W), in
contiguous or channels-last memory format (the output keeps x's format)."""

from __future__ import annotations

from opensora_fast.kernels import reference
from opensora_fast.kernels._utils import check_tensor, use_triton


def _check(x, weight, bias, num_groups):
    check_tensor(x, "x", ndim=(4, 5))
    C = x.shape[1]
    check_tensor(weight, "weight", shape=(C,), like=x)
    check_tensor(bias, "bias", shape=(C,), like=x)
    if not isinstance(num_groups, int) or num_groups < 1 or C % num_groups != 0:
        raise ValueError(f"num_groups must be a positive int dividing the {C} channels of x, got {num_groups!r}")


def group_norm_silu(x, weight, bias, num_groups, *, eps=1e-5, silu=True):
    """silu(group_norm(x, num_groups, weight, bias, eps)) (no SiLU with silu=False)."""
    _check(x, weight, bias, num_groups)
    if not use_triton(x, weight, bias):
        return reference.group_norm_silu_ref(x, weight, bias, num_groups, eps, silu)
    raise NotImplementedError("group_norm_silu: Triton kernels not written yet (CPU reference only)")

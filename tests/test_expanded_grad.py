"""Every kernel's backward handles an expanded (stride-0) upstream gradient, as ``out.sum().backward()``
produces. The generic attention backward once misread it (errors ~1e34); this guards all of them."""

import os

import pytest
import torch
from _close import assert_close_to_fp64, randn
from opensora_fast.kernels import reference as R

from opensora_fast import kernels as K

B, T, S, H, D = 1, 3, 5, 2, 24
C = H * D

CASES = {
    "self_attention spatial": (
        lambda qkv, a, b: K.self_attention(qkv, a, b, num_heads=H, num_frames=T, layout="spatial"),
        lambda qkv, a, b: R.self_attention_ref(qkv, a, b, H, T, "spatial"),
        [(B, T * S, 3 * C), (D,), (D,)],
    ),
    "self_attention temporal T=65 (generic path)": (
        lambda qkv, a, b: K.self_attention(qkv, a, b, num_heads=H, num_frames=65, layout="temporal"),
        lambda qkv, a, b: R.self_attention_ref(qkv, a, b, H, 65, "temporal"),
        [(1, 65 * 2, 3 * C), (D,), (D,)],
    ),
    "self_attention temporal T=3 (packed path)": (
        lambda qkv, a, b: K.self_attention(qkv, a, b, num_heads=H, num_frames=T, layout="temporal"),
        lambda qkv, a, b: R.self_attention_ref(qkv, a, b, H, T, "temporal"),
        [(B, T * S, 3 * 2 * 64), (64,), (64,)],
    ),
    "flash_attn_func": (K.flash_attn_func, R.flash_attn_func_ref, [(2, 7, H, D)] * 3),
    "cross_attention": (
        lambda q, kv: K.cross_attention(q, kv, [3, 4], num_heads=H),
        lambda q, kv: R.cross_attention_ref(q, kv, [3, 4], H),
        [(2, 6, C), (7, 2 * C)],
    ),
    "layernorm_modulate": (K.layernorm_modulate, R.layernorm_modulate_ref, [(2, 6, C), (2, C), (2, C)]),
    "qk_norm_rope": (
        lambda q, k, a, b: torch.stack(K.qk_norm_rope(q, k, a, b)),
        lambda q, k, a, b: torch.stack(R.qk_norm_rope_ref(q, k, a, b)),
        [(2, 5, H, D), (2, 5, H, D), (D,), (D,)],
    ),
    "causal_conv3d": (K.causal_conv3d, R.causal_conv3d_ref, [(1, 3, 3, 4, 5), (4, 3, 3, 3, 3)]),
    "group_norm_silu": (
        lambda x, w, b: K.group_norm_silu(x, w, b, 2),
        lambda x, w, b: R.group_norm_silu_ref(x, w, b, 2),
        [(1, 4, 3, 4, 5), (4,), (4,)],
    ),
}


def _grads(fn, inputs, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    fn(*leaves).sum().backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("name", list(CASES))
def test_stride0_upstream_gradient(name, monkeypatch):
    fn, ref, shapes = CASES[name]
    inputs = [randn(*s) for s in shapes]
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "triton")
    got = _grads(fn, inputs, torch.float32)
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    lowp = _grads(ref, inputs, torch.float32)
    exact = _grads(ref, inputs, torch.float64)
    for i, (g, lp, ex) in enumerate(zip(got, lowp, exact)):
        assert_close_to_fp64(g, lp, ex, name=f"{name} grad {i}")


assert os.environ.get("OPENSORA_FAST_POISON") == "1"

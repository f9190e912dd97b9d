"""opensora_fast.kernels: Triton kernels (forward and backward) for Open-Sora 1.2, each with a
plain-PyTorch reference in ``reference.py`` that is also the CPU path.

CUDA tensors run Triton, CPU tensors the reference; ``OPENSORA_FAST_BACKEND=reference|triton``
forces one (Triton on CPU needs ``TRITON_INTERPRET=1``).
"""

from opensora_fast.kernels import reference
from opensora_fast.kernels._utils import backend, use_triton
from opensora_fast.kernels.attention import cross_attention, flash_attn_func, self_attention
from opensora_fast.kernels.causal_conv3d import causal_conv3d
from opensora_fast.kernels.group_norm_silu import group_norm_silu
from opensora_fast.kernels.layernorm_modulate import (
    add_layernorm_modulate,
    gated_residual,
    layernorm_modulate,
)
from opensora_fast.kernels.qk_norm_rope import qk_norm_rope

__all__ = [
    "add_layernorm_modulate",
    "gated_residual",
    "layernorm_modulate",
    "backend",
    "causal_conv3d",
    "cross_attention",
    "flash_attn_func",
    "group_norm_silu",
    "qk_norm_rope",
    "reference",
    "self_attention",
    "use_triton",
]

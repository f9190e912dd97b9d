"""Plain-PyTorch references for every kernel: the test oracle and the CPU path.

They follow Open-Sora 1.2's numerics (../shared/reference/opensora-v1.2.md §1.3, §1.6-1.8, §3.3):
LayerNorm without affine, per-head RMSNorm computed in fp32 with the weight applied after the cast
back, interleaved RoPE over the whole head, fp32 softmax statistics, causal (front) temporal padding.
Shapes: x (B, N, C) with N = T * S tokens in frame-major order; q/k/v (B, L, H, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# adaLN modulation (§1.3)


def _per_token(v: torch.Tensor, v0: torch.Tensor | None, x_mask: torch.Tensor | None, x: torch.Tensor):
    """Broadcast a per-sample modulation (B, C) / (B, 1, C) to x (B, N, C); with x_mask (B, T) the
    frames where it is False take v0 instead (Open-Sora's t0 modulation)."""
    B, N, C = x.shape
    v = v.reshape(B, 1, C)
    if x_mask is None:
        return v
    T = x_mask.shape[1]
    sel = torch.where(x_mask.reshape(B, T, 1, 1), v.reshape(B, 1, 1, C), v0.reshape(B, 1, 1, C))
    return sel.expand(B, T, N // T, C).reshape(B, N, C)


def layernorm_modulate_ref(x, shift, scale, eps=1e-6, x_mask=None, shift0=None, scale0=None):
    """LN(x) * (1 + scale) + shift, LayerNorm without affine. ``1 + scale`` is formed in the wider of
    x's and scale's dtypes (an fp16 scale beside fp32 x is not rounded to fp16 after adding 1), as the
    Triton path does in fp32."""
    h = F.layer_norm(x, (x.shape[-1],), eps=eps)
    dt = torch.promote_types(x.dtype, scale.dtype)
    scale, scale0 = scale.to(dt), None if scale0 is None else scale0.to(dt)
    return h * (1 + _per_token(scale, scale0, x_mask, x)) + _per_token(shift, shift0, x_mask, x)


def gated_residual_ref(x, y, gate, x_mask=None, gate0=None):
    """x + gate * y."""
    return x + _per_token(gate, gate0, x_mask, x) * y


def add_layernorm_modulate_ref(
    x, y, shift, scale, gate=None, eps=1e-6, x_mask=None, shift0=None, scale0=None, gate0=None
):
    """(r, h) with r = x + gate * y (x + y without gate) and h = LN(r) * (1 + scale) + shift."""
    r = x + y if gate is None else gated_residual_ref(x, y, gate, x_mask, gate0)
    return r, layernorm_modulate_ref(r, shift, scale, eps, x_mask, shift0, scale0)


# ---------------------------------------------------------------------------------------------
# q/k RMSNorm and RoPE (§1.6, §1.7)


def rms_norm_ref(x, weight, eps=1e-6):
    """LlamaRMSNorm: fp32 statistics, cast back to x's dtype, then times the weight."""
    x32 = x.float()
    h = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.to(x.dtype) * h


def rotate_half_interleaved(x):
    """Pairs (x[2i], x[2i+1]) -> (-x[2i+1], x[2i]) (rotary_embedding_torch's rotate_half)."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def apply_rope_ref(x, cos, sin):
    """x (..., L, H, D) with cos/sin (L, D): x * cos + rotate_half(x) * sin."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half_interleaved(x) * sin


def rope_cos_sin(length: int, head_dim: int, theta: float = 10000.0, dtype=torch.float32, device=None):
    """cos, sin of shape (length, head_dim) for positions 0..length-1, each of the head_dim/2
    frequencies 1/theta^(2k/head_dim) repeated for its pair (rotary_embedding_torch, "lang")."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    ang = torch.arange(length, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    ang = ang.repeat_interleave(2, dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def qk_norm_rope_ref(q, k, q_weight, k_weight, eps=1e-6, cos=None, sin=None):
    """q, k (B, N, H, D): per-head RMSNorm over D, then interleaved RoPE along N when cos/sin given."""
    q = rms_norm_ref(q, q_weight, eps)
    k = rms_norm_ref(k, k_weight, eps)
    if cos is not None:
        q = apply_rope_ref(q, cos, sin)
        k = apply_rope_ref(k, cos, sin)
    return q, k


# ---------------------------------------------------------------------------------------------
# attention (§1.7, §1.8, §2)


def attention_ref(q, k, v, softmax_scale=None, causal=False, key_mask=None):
    """softmax(q k^T * scale) v on (B, L, H, D) inputs, softmax statistics in fp32: explicit on CPU,
    SDPA on CUDA when there is no mask.

    ``causal`` is bottom-right aligned as in flash-attn (query i sees keys j <= i + Lk - Lq);
    ``key_mask`` (B, Lk) bool hides keys. Rows that see no key output zeros (flash-attn's rule).
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if q.is_cuda and not causal and key_mask is None:
        # on a GPU the reference path is SDPA (flash / cuDNN / efficient), as Open-Sora's GPU path
        # uses flash-attn: never materialise the score matrix at video shapes
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return o.transpose(1, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k).float() * scale
    Lq, Lk = q.shape[1], k.shape[1]
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.ones_like(allowed).tril(Lk - Lq)
    allowed = allowed[None, None].expand(q.shape[0], 1, Lq, Lk)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    # rows that see no key are all -inf (softmax NaN): zero only those, so NaN / inf in q, k or the
    # weights still propagates as on the Triton path
    p = torch.softmax(s, dim=-1).masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    if q.dtype == torch.float64:
        p = p.double()
    return torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)


def flash_attn_func_ref(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    return attention_ref(q, k, v, softmax_scale, causal)


def split_qkv(qkv, num_heads):
    """qkv (B, N, 3C) with columns [q heads | k heads | v heads] -> q, k, v each (B, N, H, D)."""
    B, N, C3 = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, C3 // (3 * num_heads)).unbind(2)


def self_attention_ref(
    qkv, q_norm_weight, k_norm_weight, num_heads, num_frames, layout, eps=1e-6, rope=None, softmax_scale=None
):
    """Open-Sora's Attention on the raw qkv Linear output (B, T*S, 3C) -> (B, T*S, C).

    layout "spatial" attends over the S tokens of each frame, "temporal" over the T frames of each
    spatial position. q/k get RMSNorm, then RoPE when rope=(cos, sin) with cos/sin (L, D).
    """
    B, N, C3 = qkv.shape
    C, T = C3 // 3, num_frames
    S = N // T
    q, k, v = split_qkv(qkv, num_heads)  # (B, T*S, H, D)
    D = q.shape[-1]

    def to_seq(t):  # -> (B*, L, H, D)
        t = t.reshape(B, T, S, num_heads, D)
        if layout == "temporal":
            t = t.transpose(1, 2)
        return t.reshape(-1, t.shape[2], num_heads, D)

    q, k, v = to_seq(q), to_seq(k), to_seq(v)
    cos, sin = rope if rope is not None else (None, None)
    q, k = qk_norm_rope_ref(q, k, q_norm_weight, k_norm_weight, eps, cos, sin)
    o = attention_ref(q, k, v, softmax_scale)
    o = o.reshape(B, -1, o.shape[1], C)  # (B, T, S, C) or (B, S, T, C)
    if layout == "temporal":
        o = o.transpose(1, 2)
    return o.reshape(B, N, C)


def cross_attention_ref(q, kv, kv_lens, num_heads, softmax_scale=None):
    """q (B, N, C) attends to its own sample's packed text kv (sum(kv_lens), 2C) -> (B, N, C)."""
    B, N, C = q.shape
    D = C // num_heads
    lens = [int(n) for n in kv_lens]
    k, v = kv.reshape(kv.shape[0], 2, num_heads, D).unbind(1)
    out, start = [], 0
    for b, n in enumerate(lens):
        if n == 0:
            out.append(torch.zeros_like(q[b]))
            continue
        kb, vb = k[start : start + n][None], v[start : start + n][None]
        out.append(attention_ref(q[b].reshape(1, N, num_heads, D), kb, vb, softmax_scale).reshape(N, C))
        start += n
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# VAE (§3.3)


def causal_pad_amounts(kernel_size, stride_t=1, dilation_t=1):
    """(time_pad_front, h_pad, w_pad) of Open-Sora's CausalConv3d."""
    kt, kh, kw = kernel_size
    return dilation_t * (kt - 1) + (1 - stride_t), kh // 2, kw // 2


def causal_conv3d_ref(x, weight, bias=None, stride=(1, 1, 1), padding_mode="zeros"):
    """x (B, Cin, T, H, W), weight (Cout, Cin, kt, kh, kw): all temporal padding at the front,
    symmetric spatial padding k//2, then a plain Conv3d with no padding."""
    tp, hp, wp = causal_pad_amounts(weight.shape[2:], stride[0])
    mode = {"zeros": "constant", "constant": "constant", "replicate": "replicate"}[padding_mode]
    x = F.pad(x, (wp, wp, hp, hp, tp, 0), mode=mode)
    return F.conv3d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride=stride)


def group_norm_silu_ref(x, weight, bias, num_groups, eps=1e-5, silu=True):
    """GroupNorm (affine) then SiLU on (B, C, ...) tensors."""
    h = F.group_norm(x, num_groups, weight.to(x.dtype), bias.to(x.dtype), eps)
    return F.silu(h) if silu else h

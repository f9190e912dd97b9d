"""What runs: the calls the sm_90 gate records, at the real Open-Sora 1.2 shapes (STDiT3-XL/2, the 1.2 VAE).

Each :class:`Case` makes real calls of the public ops or the models on ``meta`` tensors inside
``kernels._record.recording()`` (nothing is allocated or run) and states the floor of its work:
bytes that must cross HBM once and/or useful FLOPs. Cases with a floor form the estimate table;
coverage cases (``floor`` None: whole models, other head dims) only add launches to compile.

Shapes (../shared/reference/opensora-v1.2.md): hidden 1152 = 16 heads x 72; 720p latent 90 x 160 -> 45 x 80
= 3600 tokens per frame; 480p 60 x 106 -> 30 x 53 = 1590; 2 s = 51 frames -> 15 latent frames, 4 s -> 30,
16 s -> 120; sampling batch 2 (the CFG pair).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

C, HEADS, D = 1152, 16, 72
BF16 = torch.bfloat16


@dataclass
class Case:
    name: str
    run: Callable[[], None]  # makes the calls (inside recording())
    flops: float = 0.0  # useful FLOPs
    bytes: float = 0.0  # bytes that must cross HBM at least once
    note: str = ""
    kv_lens: tuple | None = None  # varlen cases: the real key lengths (the launches carry the bucketed one)

    @property
    def has_floor(self) -> bool:
        return bool(self.flops or self.bytes)


def _t(*shape, dtype=BF16, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def _backward(*outs):
    torch.autograd.backward([o for o in outs], [torch.empty_like(o) for o in outs])


# ---------------------------------------------------------------------------------------------
# per-op cases


def _ln_case(B, N, fwd_bwd: bool, add: bool):
    def run():
        x = _t(B, N, C, grad=fwd_bwd)
        shift, scale, gate = (_t(B, C, grad=fwd_bwd) for _ in range(3))
        if add:
            y = _t(B, N, C, grad=fwd_bwd)
            from opensora_fast.kernels import add_layernorm_modulate

            r, h = add_layernorm_modulate(x, y, shift, scale, gate=gate)
            outs = (r, h)
        else:
            from opensora_fast.kernels import layernorm_modulate

            outs = (layernorm_modulate(x, shift, scale),)
        if fwd_bwd:
            _backward(*outs)

    return run


def _self_attn_case(B, T, S, layout: str, fwd_bwd: bool, rope: bool = False):
    def run():
        from opensora_fast.kernels import self_attention

        qkv = _t(B, T * S, 3 * C, grad=fwd_bwd)
        qw, kw = _t(D, grad=fwd_bwd), _t(D, grad=fwd_bwd)
        kwargs = {}
        if rope:
            kwargs["rope"] = (_t(T, D, dtype=torch.float32), _t(T, D, dtype=torch.float32))
        o = self_attention(qkv, qw, kw, num_heads=HEADS, num_frames=T, layout=layout, **kwargs)
        if fwd_bwd:
            _backward(o)

    return run


def _with_bwd_design(design: str, run):
    """``run`` with the attention backward design ``design`` (``attention.BWD_DESIGN``), to compare both."""

    def wrapped():
        from opensora_fast.kernels import attention

        old = attention.BWD_DESIGN
        attention.BWD_DESIGN = design
        try:
            run()
        finally:
            attention.BWD_DESIGN = old

    return wrapped


def _cross_case(B, N, lens, fwd_bwd: bool):
    def run():
        from opensora_fast.kernels import cross_attention

        q = _t(B, N, C, grad=fwd_bwd)
        kv = _t(sum(lens), 2 * C, grad=fwd_bwd)
        o = cross_attention(q, kv, list(lens), num_heads=HEADS)
        if fwd_bwd:
            _backward(o)

    return run


def _flash_case(B, L, H, Dh, dtype, causal=False, fwd_bwd=False):
    def run():
        from opensora_fast.kernels import flash_attn_func

        q, k, v = (_t(B, L, H, Dh, dtype=dtype, grad=fwd_bwd) for _ in range(3))
        o = flash_attn_func(q, k, v, causal=causal)
        if fwd_bwd:
            _backward(o)

    return run


def _qk_case(B, N, fwd_bwd: bool):
    def run():
        from opensora_fast.kernels import qk_norm_rope

        q, k = _t(B, N, HEADS, D, grad=fwd_bwd), _t(B, N, HEADS, D, grad=fwd_bwd)
        w = _t(D, grad=fwd_bwd)
        cos, sin = _t(N, D, dtype=torch.float32), _t(N, D, dtype=torch.float32)
        outs = qk_norm_rope(q, k, w, w, cos=cos, sin=sin)
        if fwd_bwd:
            _backward(*outs)

    return run


def _conv_case(B, Cin, Cout, T, H, W, fwd_bwd: bool):
    def run():
        from opensora_fast.kernels import causal_conv3d

        x = _t(B, Cin, T, H, W, grad=fwd_bwd).to(memory_format=torch.channels_last_3d)
        w = _t(Cout, Cin, 3, 3, 3, grad=fwd_bwd)
        b = _t(Cout, grad=fwd_bwd)
        y = causal_conv3d(x, w, b)
        if fwd_bwd:
            _backward(y)

    return run


def _gn_case(B, Ch, T, H, W, fwd_bwd: bool):
    def run():
        from opensora_fast.kernels import group_norm_silu

        x = _t(B, Ch, T, H, W, grad=fwd_bwd).to(memory_format=torch.channels_last_3d)
        w, b = _t(Ch, grad=fwd_bwd), _t(Ch, grad=fwd_bwd)
        y = group_norm_silu(x, w, b, 32)
        if fwd_bwd:
            _backward(y)

    return run


# ---------------------------------------------------------------------------------------------
# coverage: the models as they run


def _stdit3_case(B, T, H, W, depth=1, train=True):
    def run():
        from opensora_fast.models.stdit3 import STDiT3, STDiT3Config

        with torch.device("meta"):
            model = STDiT3(STDiT3Config(depth=depth)).to(BF16)
        x = _t(B, 4, T, H, W)
        t = _t(B, dtype=torch.float32)
        y = _t(B, 1, 300, 4096)
        x_mask = torch.ones(B, T, dtype=torch.bool, device="meta")  # reads as "some frame conditioning"
        if not train:
            with torch.no_grad():
                model(x, t, y, x_mask=x_mask, fps=24.0, height=8.0 * H, width=8.0 * W)
            return
        out = model(x, t, y, x_mask=x_mask, fps=24.0, height=8.0 * H, width=8.0 * W)
        _backward(out)

    return run


def _vae_case(frames, H, W):
    def run():
        from opensora_fast.models.vae import OpenSoraVAE, OpenSoraVAEConfig

        with torch.device("meta"):
            vae = OpenSoraVAE(OpenSoraVAEConfig.v1_2()).to(BF16)
        lat = vae.get_latent_size((frames, H, W))
        z = _t(1, 4, *lat)
        with torch.no_grad():
            vae.decode(z, num_frames=frames)

    return run


def _flops_attn(BH, Lq, Lk, Dh):
    return 4.0 * BH * Lq * Lk * Dh


def cases() -> list[Case]:
    B = 2
    N720, N480 = 15 * 3600, 30 * 1590
    tok = 2 * C  # bytes per bf16 hidden vector
    out = [
        Case("layernorm_modulate fwd 720p-2s", _ln_case(B, N720, False, False), bytes=2 * B * N720 * tok,
             note="(2, 54000, 1152) bf16: read x, write h"),
        Case("add_layernorm_modulate fwd 720p-2s", _ln_case(B, N720, False, True), bytes=4 * B * N720 * tok,
             note="read x, y; write r, h"),
        Case("add_layernorm_modulate fwd+bwd 720p-2s", _ln_case(B, N720, True, True), bytes=10 * B * N720 * tok,
             note="fwd 4 + bwd 6 activation tensors"),
        Case("spatial attention fwd 720p-2s", _self_attn_case(B, 15, 3600, "spatial", False),
             flops=_flops_attn(B * 15 * HEADS, 3600, 3600, D), note="B*T 30, S 3600, 16 x 72, qk RMSNorm"),
        Case("spatial attention fwd+bwd 720p-2s", _self_attn_case(B, 15, 3600, "spatial", True),
             flops=3.5 * _flops_attn(B * 15 * HEADS, 3600, 3600, D), note="bwd = 2.5 x fwd FLOPs"),
        Case("spatial attention fwd+bwd 720p-2s, fused bwd",
             _with_bwd_design("fused", _self_attn_case(B, 15, 3600, "spatial", True)),
             flops=3.5 * _flops_attn(B * 15 * HEADS, 3600, 3600, D),
             note="the one-kernel 5-matmul backward with fp32 dQ partials, for comparison"),
        Case("spatial attention fwd 480p-4s", _self_attn_case(B, 30, 1590, "spatial", False),
             flops=_flops_attn(B * 30 * HEADS, 1590, 1590, D), note="B*T 60, S 1590"),
        Case("temporal attention fwd T'=30 480p-4s", _self_attn_case(B, 30, 1590, "temporal", False, rope=True),
             bytes=B * N480 * 4 * tok, note="read qkv, write o; RoPE"),
        Case("temporal attention fwd+bwd T'=30 480p-4s", _self_attn_case(B, 30, 1590, "temporal", True, rope=True),
             bytes=B * N480 * 11 * tok, note="fwd 4C + bwd 7C per token"),
        Case("temporal attention fwd T'=120 720p-16s", _self_attn_case(1, 120, 3600, "temporal", False, rope=True),
             bytes=120 * 3600 * 4 * tok, note="B 1, S 3600"),
        Case("temporal attention fwd+bwd T'=120 720p-16s",
             _self_attn_case(1, 120, 3600, "temporal", True, rope=True), bytes=120 * 3600 * 11 * tok),
        Case("cross attention fwd 720p-2s", _cross_case(B, N720, (300, 300), False),
             flops=_flops_attn(B * HEADS, N720, 300, D), note="N 54000, 300 text tokens", kv_lens=(300, 300)),
        Case("cross attention fwd+bwd 720p-2s", _cross_case(B, N720, (300, 300), True),
             flops=3.5 * _flops_attn(B * HEADS, N720, 300, D), kv_lens=(300, 300)),
        Case("qk_norm_rope fwd 720p-2s", _qk_case(B, N720, False), bytes=4 * B * N720 * tok,
             note="read q, k; write both"),
        Case("qk_norm_rope fwd+bwd 720p-2s", _qk_case(B, N720, True), bytes=(4 + 6) * B * N720 * tok,
             note="bwd reads dq, dk, q, k; writes dq, dk"),
        Case("causal_conv3d fwd 512->512 720p chunk", _conv_case(1, 512, 512, 5, 90, 160, False),
             flops=2.0 * 512 * 512 * 27 * 5 * 90 * 160, note="temporal VAE width, channels_last_3d"),
        Case("group_norm_silu fwd 512ch 720p chunk", _gn_case(1, 512, 5, 90, 160, False),
             bytes=2 * 512 * 5 * 90 * 160 * 2, note="read x, write y"),
        # calibration: a plain flash forward at the shape of a published H100 figure of Triton's
        # fused-attention tutorial (pytorch/benchmark #2391: (4, 16, 4096, 128): 458 TFLOP/s)
        Case("flash_attn_func fwd (4,4096,16,128) fp16", _flash_case(4, 4096, 16, 128, torch.float16),
             flops=_flops_attn(4 * 16, 4096, 4096, 128), note="calibration shape"),
        # coverage only
        Case("STDiT3-XL/2 block fwd+bwd 720p-2s", _stdit3_case(B, 15, 90, 160)),
        Case("STDiT3-XL/2 block fwd 720p-16s", _stdit3_case(1, 120, 90, 160, train=False)),
        Case("STDiT3-XL/2 block fwd+bwd 240p-4s", _stdit3_case(B, 30, 30, 53)),
        Case("VAE decode 720p 17 frames", _vae_case(17, 720, 1280)),
        Case("flash_attn_func fwd+bwd D 72 causal", _flash_case(2, 1000, 16, 72, BF16, causal=True, fwd_bwd=True)),
        Case("flash_attn_func fwd+bwd D 64", _flash_case(2, 1024, 16, 64, BF16, fwd_bwd=True)),
        Case("flash_attn_func fwd+bwd D 128 causal", _flash_case(2, 1000, 16, 128, BF16, causal=True, fwd_bwd=True)),
        Case("cross attention fwd+bwd varlen", _cross_case(B, 1590, (37, 300), True), kv_lens=(37, 300)),
        Case("causal_conv3d fwd+bwd 128->128 240p", _conv_case(1, 128, 128, 5, 30, 53, True)),
        Case("group_norm_silu fwd+bwd 256ch", _gn_case(1, 256, 5, 30, 53, True)),
    ]  # fmt: skip
    return out

"""Fused attention (flash_attn_func, self_attention, cross_attention): forward and every gradient of
the Triton kernels against the fp64 PyTorch reference (interpreter on CPU, tiny awkward shapes), input
validation, torch.compile tracing, and bf16 real shapes on a GPU."""

from __future__ import annotations

import pytest
import torch
from opensora_fast.kernels import cross_attention, flash_attn_func, self_attention
from opensora_fast.kernels import reference as R

from tests._close import assert_close_to_fp64, randn

HAS_CUDA = torch.cuda.is_available()


def _check(kernel_fn, ref_fn, inputs, dtype, names, device, grad_mask=None):
    """Forward and gradients of kernel_fn (inputs cast to dtype) vs ref_fn in dtype and in fp64.
    inputs are fp64 tensors; grad_mask says which get gradients (default all)."""
    grad_mask = grad_mask or [True] * len(inputs)
    lowp = [t.to(device=device, dtype=dtype) for t in inputs]
    hi = [t.to(device=device, dtype=torch.float64) for t in inputs]

    def run(fn, xs):
        leaves = [x.detach().clone().requires_grad_(m) for x, m in zip(xs, grad_mask)]
        out = fn(*leaves)
        return out, leaves

    out, leaves = run(kernel_fn, lowp)
    g = randn(*out.shape, dtype=torch.float64, seed=7).to(device)
    grads = torch.autograd.grad(out, [x for x in leaves if x.requires_grad], g.to(out.dtype))
    out_l, leaves_l = run(ref_fn, lowp)
    grads_l = torch.autograd.grad(out_l, [x for x in leaves_l if x.requires_grad], g.to(out_l.dtype))
    out_h, leaves_h = run(ref_fn, hi)
    grads_h = torch.autograd.grad(out_h, [x for x in leaves_h if x.requires_grad], g)
    assert out.dtype == dtype
    assert_close_to_fp64(out, out_l, out_h, name="out")
    for n, a, b, c in zip(names, grads, grads_l, grads_h):
        assert a.dtype == dtype, n
        assert_close_to_fp64(a, b, c, name=n)


# --------------------------------------------------------------------------------------------
# flash_attn_func


@pytest.mark.parametrize(
    "dtype,D,Nq,Nk,causal",
    [
        (torch.float32, 72, 19, 23, False),
        (torch.float16, 72, 19, 23, True),
        (torch.float32, 64, 21, 21, True),
        (torch.float16, 40, 23, 17, True),  # causal with Nq > Nk: the first rows see no key -> zeros
        (torch.float32, 72, 1, 5, False),  # N = 1
        (torch.float16, 128, 9, 1, False),
    ],
)
def test_flash_attn_func(triton_backend, dtype, D, Nq, Nk, causal):
    B, H = 2, 2
    q, k, v = (randn(B, n, H, D, dtype=torch.float64, seed=s) for s, n in ((1, Nq), (2, Nk), (3, Nk)))
    _check(
        lambda q, k, v: flash_attn_func(q, k, v, causal=causal),
        lambda q, k, v: R.attention_ref(q, k, v, causal=causal),
        [q, k, v],
        dtype,
        ["dq", "dk", "dv"],
        "cpu",
    )


def test_flash_attn_func_strided_views(triton_backend):
    """q/k/v as strided views of one packed (B, N, 3, H, D) tensor (no copies), explicit scale."""
    B, N, H, D = 1, 13, 2, 72
    qkv = randn(B, N, 3, H, D, dtype=torch.float32, seed=4)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = flash_attn_func(q, k, v, softmax_scale=0.3)
    ref = R.attention_ref(*(t.double() for t in (q, k, v)), softmax_scale=0.3)
    lowp = R.attention_ref(q, k, v, softmax_scale=0.3)
    assert_close_to_fp64(out, lowp, ref)


def test_flash_attn_func_reference_dispatch_on_cpu(reference_backend):
    q, k, v = (randn(1, 5, 2, 16, seed=s) for s in (1, 2, 3))
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True), R.attention_ref(q, k, v, causal=True))


# --------------------------------------------------------------------------------------------
# self_attention


@pytest.mark.parametrize(
    "dtype,D,layout,rope,B,T,S",
    [
        (torch.float32, 72, "spatial", False, 2, 2, 19),
        (torch.float16, 72, "spatial", False, 2, 2, 19),
        (torch.float32, 72, "temporal", True, 1, 5, 3),
        (torch.float16, 72, "temporal", True, 2, 7, 2),
        (torch.float16, 64, "spatial", True, 2, 2, 7),
        (torch.float32, 40, "temporal", False, 2, 9, 2),
        (torch.float32, 72, "temporal", True, 2, 1, 3),  # T = 1: sequences of one token
        (torch.float32, 72, "temporal", True, 1, 19, 2),  # T > 16: several blocks per sequence
    ],
)
def test_self_attention(triton_backend, dtype, D, layout, rope, B, T, S):
    H = 2
    C = H * D
    qkv = randn(B, T * S, 3 * C, dtype=torch.float64, seed=5)
    qw = 1 + 0.3 * randn(D, dtype=torch.float64, seed=6)
    kw = 1 + 0.3 * randn(D, dtype=torch.float64, seed=8)
    L = S if layout == "spatial" else T
    cos, sin = R.rope_cos_sin(L, D, dtype=torch.float64)

    def kern(qkv, qw, kw, cos, sin):
        rp = (cos.float(), sin.float()) if rope else None
        return self_attention(qkv, qw, kw, num_heads=H, num_frames=T, layout=layout, rope=rp)

    def refn(qkv, qw, kw, cos, sin):
        return R.self_attention_ref(qkv, qw, kw, H, T, layout, 1e-6, (cos, sin) if rope else None)

    _check(kern, refn, [qkv, qw, kw, cos, sin], dtype, ["dqkv", "dq_norm_weight", "dk_norm_weight"], "cpu",
           grad_mask=[True, True, True, False, False])  # fmt: skip


def test_self_attention_strided_qkv_view(triton_backend):
    """qkv as a column slice of a wider tensor (row stride != 3C): read with strides, no copy."""
    B, T, S, H, D = 1, 3, 4, 2, 16
    wide = randn(B, T * S, 3 * H * D + 8, seed=11)
    qkv = wide[..., : 3 * H * D]
    assert not qkv.is_contiguous()
    w = 1 + 0.3 * randn(D, seed=12)
    for layout in ("spatial", "temporal"):
        out = self_attention(qkv, w, w, num_heads=H, num_frames=T, layout=layout)
        ref = R.self_attention_ref(qkv.double(), w.double(), w.double(), H, T, layout)
        assert_close_to_fp64(out, R.self_attention_ref(qkv, w, w, H, T, layout), ref)


@pytest.mark.parametrize("backend", ["triton_backend", "reference_backend"])
def test_self_attention_no_grad_to_rope_tables(backend, request):
    request.getfixturevalue(backend)
    T, S, H, D = 3, 2, 2, 16
    qkv = randn(1, T * S, 3 * H * D, seed=1).requires_grad_()
    w = randn(D, seed=2).requires_grad_()
    cos, sin = (t.requires_grad_() for t in R.rope_cos_sin(T, D))
    self_attention(qkv, w, w, num_heads=H, num_frames=T, layout="temporal", rope=(cos, sin)).sum().backward()
    assert qkv.grad is not None and w.grad is not None
    assert cos.grad is None and sin.grad is None


def test_head_dim_split():
    """D = 72 runs as 64 + 16 (8 real): 90% useful MMA width instead of 56% for one 128 block."""
    from opensora_fast.kernels.attention import DSplit

    assert DSplit.of(72) == DSplit(64, 16, True)
    assert DSplit.of(64) == DSplit(64, 16, False)
    assert DSplit.of(40) == DSplit(32, 16, True)
    assert DSplit.of(128) == DSplit(128, 16, False)
    assert DSplit.of(8) == DSplit(16, 16, False)


def test_self_attention_matches_reference_dispatch(reference_backend):
    qkv = randn(1, 6, 3 * 32, seed=1)
    w = randn(16, seed=2)
    out = self_attention(qkv, w, w, num_heads=2, num_frames=3, layout="temporal", rope=R.rope_cos_sin(3, 16))
    torch.testing.assert_close(
        out, R.self_attention_ref(qkv, w, w, 2, 3, "temporal", 1e-6, R.rope_cos_sin(3, 16), None)
    )


def test_self_attention_compiles_fullgraph(triton_backend):
    """torch.compile(fullgraph=True) traces the custom ops (forward and backward) without graph breaks."""
    T, S, H, D = 2, 3, 2, 16
    qkv = randn(1, T * S, 3 * H * D, seed=1).requires_grad_()
    qw, kw = randn(D, seed=2).requires_grad_(), randn(D, seed=3).requires_grad_()
    cs = R.rope_cos_sin(T, D)

    def f(qkv, qw, kw):
        return self_attention(qkv, qw, kw, num_heads=H, num_frames=T, layout="temporal", rope=cs).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(qkv, qw, kw)
    out.backward()
    ref = R.self_attention_ref(qkv.detach(), qw.detach(), kw.detach(), H, T, "temporal", 1e-6, cs).sum()
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-4)
    assert qkv.grad is not None and qw.grad is not None and kw.grad is not None


# --------------------------------------------------------------------------------------------
# cross_attention


@pytest.mark.parametrize(
    "dtype,D,lens,N",
    [
        (torch.float32, 72, [5, 0, 18], 11),  # a zero-length sample gets zeros
        (torch.float16, 72, [1, 17, 0], 9),
        (torch.float16, 64, [3, 20], 1),
    ],
)
def test_cross_attention(triton_backend, dtype, D, lens, N):
    H = 2
    C = H * D
    q = randn(len(lens), N, C, dtype=torch.float64, seed=9)
    kv = randn(sum(lens), 2 * C, dtype=torch.float64, seed=10)
    kv_lens = torch.tensor(lens) if dtype == torch.float16 else lens
    _check(
        lambda q, kv: cross_attention(q, kv, kv_lens, num_heads=H),
        lambda q, kv: R.cross_attention_ref(q, kv, lens, H),
        [q, kv],
        dtype,
        ["dq", "dkv"],
        "cpu",
    )


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs():
    q = torch.randn(1, 4, 2, 72)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="k must have shape"):
        flash_attn_func(q, torch.randn(1, 4, 3, 72), q)
    with pytest.raises(ValueError, match="head_dim"):
        x = torch.randn(1, 4, 2, 12)
        flash_attn_func(x, x, x)
    with pytest.raises(ValueError, match="head_dim"):
        x = torch.randn(1, 4, 2, 136)
        flash_attn_func(x, x, x)
    with pytest.raises(ValueError, match="same dtype"):
        flash_attn_func(q, q.half(), q)
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_attn_func(q, q, q, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="q must have 4"):
        flash_attn_func(q[0], q, q)

    qkv, w = torch.randn(2, 6, 3 * 144), torch.randn(72)
    kw = dict(num_heads=2, num_frames=3)
    with pytest.raises(ValueError, match="layout"):
        self_attention(qkv, w, w, layout="full", **kw)
    with pytest.raises(ValueError, match="num_frames"):
        self_attention(qkv, w, w, num_heads=2, num_frames=4, layout="spatial")
    with pytest.raises(ValueError, match="q_norm_weight must have shape"):
        self_attention(qkv, torch.randn(64), w, layout="spatial", **kw)
    with pytest.raises(ValueError, match="rope cos must have shape"):
        self_attention(qkv, w, w, layout="temporal", rope=R.rope_cos_sin(2, 72), **kw)
    with pytest.raises(ValueError, match="rope must be"):
        self_attention(qkv, w, w, layout="temporal", rope=torch.randn(3, 72), **kw)
    with pytest.raises(ValueError, match="num_heads"):
        self_attention(qkv, w, w, num_heads=5, num_frames=3, layout="spatial")
    with pytest.raises(ValueError, match="qkv must be a floating-point"):
        self_attention(qkv.long(), w, w, layout="spatial", **kw)

    q, kv = torch.randn(2, 5, 144), torch.randn(7, 288)
    with pytest.raises(ValueError, match="sum\\(kv_lens\\)"):
        cross_attention(q, kv, [3, 3], num_heads=2)
    with pytest.raises(ValueError, match="one length per sample"):
        cross_attention(q, kv, [7], num_heads=2)
    with pytest.raises(ValueError, match="non-negative"):
        cross_attention(q, kv, [8, -1], num_heads=2)
    with pytest.raises(ValueError, match="integer tensor"):
        cross_attention(q, kv, torch.tensor([3.0, 4.0]), num_heads=2)
    with pytest.raises(ValueError, match="kv must have shape"):
        cross_attention(q, torch.randn(7, 144), [3, 4], num_heads=2)


def test_non_contiguous_last_dim_rejected_on_triton_path(triton_backend):
    q = torch.randn(1, 4, 2, 72).transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        flash_attn_func(q, q, q)


# --------------------------------------------------------------------------------------------
# bf16 real shapes (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "layout,T,S,B",
    # temporal: B*S = 2048 sequences of 30 frames (packed 64-row tiles); 512 of 120 and 1024 of 67 frames
    # (one 128-frame tile per sequence, split backward)
    [("spatial", 2, 1590, 1), ("temporal", 30, 1024, 2), ("temporal", 120, 512, 1), ("temporal", 67, 1024, 1)],
)
def test_self_attention_bf16_real_shapes(layout, T, S, B):
    H, D = 16, 72
    C = H * D
    qkv = randn(B, T * S, 3 * C, dtype=torch.float64, seed=1)
    qw = 1 + 0.3 * randn(D, dtype=torch.float64, seed=2)
    kw = 1 + 0.3 * randn(D, dtype=torch.float64, seed=3)
    rope = layout == "temporal"
    cos, sin = R.rope_cos_sin(T if rope else S, D, dtype=torch.float64)

    def kern(qkv, qw, kw, cos, sin):
        rp = (cos.float(), sin.float()) if rope else None
        return self_attention(qkv, qw, kw, num_heads=H, num_frames=T, layout=layout, rope=rp)

    def refn(qkv, qw, kw, cos, sin):
        return R.self_attention_ref(qkv, qw, kw, H, T, layout, 1e-6, (cos, sin) if rope else None)

    _check(kern, refn, [qkv, qw, kw, cos, sin], torch.bfloat16, ["dqkv", "dq_norm_weight", "dk_norm_weight"],
           "cuda", grad_mask=[True, True, True, False, False])  # fmt: skip


@pytest.mark.gpu
def test_cross_attention_bf16_real_shape():
    H, D, N = 16, 72, 3600
    lens = [300, 0, 117]
    q = randn(len(lens), N, H * D, dtype=torch.float64, seed=1)
    kv = randn(sum(lens), 2 * H * D, dtype=torch.float64, seed=2)
    _check(
        lambda q, kv: cross_attention(q, kv, lens, num_heads=H),
        lambda q, kv: R.cross_attention_ref(q, kv, lens, H),
        [q, kv],
        torch.bfloat16,
        ["dq", "dkv"],
        "cuda",
    )


@pytest.mark.gpu
@pytest.mark.parametrize("D,causal", [(72, False), (128, True), (64, False)])
def test_flash_attn_func_bf16(D, causal):
    q, k, v = (randn(2, n, 16, D, dtype=torch.float64, seed=s) for s, n in ((1, 1000), (2, 1100), (3, 1100)))
    _check(
        lambda q, k, v: flash_attn_func(q, k, v, causal=causal),
        lambda q, k, v: R.attention_ref(q, k, v, causal=causal),
        [q, k, v],
        torch.bfloat16,
        ["dq", "dk", "dv"],
        "cuda",
    )


# --------------------------------------------------------------------------------------------
# temporal self-attention: block-diagonal packed kernels (_attention_temporal.py)


class _CountLaunches:
    """Stands in for a @triton.jit kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.n = kernel, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.kernel[grid]


@pytest.fixture
def temporal_launches(monkeypatch, triton_backend):
    """Counts the packed temporal kernels' launches; the generic flash path fails the test if used."""
    from opensora_fast.kernels import attention as A

    fwd = _CountLaunches(A._temporal_attention_fwd_kernel)
    bwd = _CountLaunches(A._temporal_attention_bwd_kernel)
    bwd_dq = _CountLaunches(A._temporal_attention_bwd_dq_kernel)
    monkeypatch.setattr(A, "_temporal_attention_fwd_kernel", fwd)
    monkeypatch.setattr(A, "_temporal_attention_bwd_kernel", bwd)
    monkeypatch.setattr(A, "_temporal_attention_bwd_dq_kernel", bwd_dq)

    def generic(*args, **kwargs):
        raise AssertionError("the generic flash path ran for a shape the packed temporal kernels support")

    monkeypatch.setattr(A, "_launch_fwd", generic)
    monkeypatch.setattr(A, "_launch_bwd", generic)
    return fwd, bwd, bwd_dq


@pytest.mark.parametrize(
    "dtype,D,rope,B,T,S",
    [
        (torch.float32, 72, True, 2, 1, 5),  # T = 1; TP = 16, 4 sequences per tile, S % 4 != 0
        (torch.float16, 72, True, 1, 3, 6),
        (torch.float32, 64, False, 2, 5, 3),  # G > 1 packing with padded frames, one partial tile per b
        (torch.float16, 64, True, 1, 5, 7),
        (torch.float32, 72, False, 1, 17, 3),  # TP = 32: 2 sequences per tile
        (torch.float16, 72, True, 2, 17, 1),
        # 65..128 frames (TP = 128): one sequence per tile, split backward (dK/dV + lse/delta, then dQ)
        (torch.float32, 72, True, 1, 67, 2),
        (torch.float16, 72, True, 1, 120, 1),  # Open-Sora's longest clip: 120 latent frames
        (torch.float32, 64, False, 2, 128, 1),  # exactly full tile
        (torch.float16, 64, True, 1, 93, 2),
    ],
)
def test_temporal_packed_kernel(temporal_launches, dtype, D, rope, B, T, S):
    H = 2
    C = H * D
    qkv = randn(B, T * S, 3 * C, dtype=torch.float64, seed=21)
    qw = 1 + 0.3 * randn(D, dtype=torch.float64, seed=22)
    kw = 1 + 0.3 * randn(D, dtype=torch.float64, seed=23)
    cos, sin = R.rope_cos_sin(T, D, dtype=torch.float64)

    def kern(qkv, qw, kw, cos, sin):
        rp = (cos.float(), sin.float()) if rope else None
        return self_attention(qkv, qw, kw, num_heads=H, num_frames=T, layout="temporal", rope=rp)

    def refn(qkv, qw, kw, cos, sin):
        return R.self_attention_ref(qkv, qw, kw, H, T, "temporal", 1e-6, (cos, sin) if rope else None)

    _check(kern, refn, [qkv, qw, kw, cos, sin], dtype, ["dqkv", "dq_norm_weight", "dk_norm_weight"], "cpu",
           grad_mask=[True, True, True, False, False])  # fmt: skip
    fwd, bwd, bwd_dq = temporal_launches
    assert (fwd.n, bwd.n, bwd_dq.n) == (1, 1, int(T > 64))


def test_temporal_packed_kernel_expanded_grad(temporal_launches):
    """out.sum().backward() hands the backward a stride-0 gradient: copied once, then the packed kernel."""
    T, S, H, D = 3, 2, 2, 64
    qkv = randn(1, T * S, 3 * H * D, seed=31).requires_grad_()
    w = (1 + 0.3 * randn(D, seed=32)).requires_grad_()
    cs = R.rope_cos_sin(T, D)
    self_attention(qkv, w, w, num_heads=H, num_frames=T, layout="temporal", rope=cs).sum().backward()
    q64, w64 = qkv.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    R.self_attention_ref(q64, w64, w64, H, T, "temporal", 1e-6, tuple(t.double() for t in cs)).sum().backward()
    ql, wl = qkv.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    R.self_attention_ref(ql, wl, wl, H, T, "temporal", 1e-6, cs).sum().backward()
    assert_close_to_fp64(qkv.grad, ql.grad, q64.grad, name="dqkv")
    assert_close_to_fp64(w.grad, wl.grad, w64.grad, name="dnorm_weight")
    assert temporal_launches[1].n == 1


def test_temporal_packed_routing():
    """Packed kernels for T <= 128, D in {64, 72} and row strides multiples of 8; else the generic path."""
    from opensora_fast.kernels.attention import TemporalTile, temporal_supported

    qkv = torch.zeros(1, 8, 3 * 2 * 72 + 8)
    assert temporal_supported(qkv[..., : 3 * 144], 64, 72)
    assert temporal_supported(qkv[..., : 3 * 128], 1, 64)
    assert temporal_supported(qkv[..., : 3 * 144], 128, 72)
    assert not temporal_supported(qkv[..., : 3 * 144], 129, 72)
    assert not temporal_supported(qkv[..., : 3 * 80], 8, 40)
    assert not temporal_supported(torch.zeros(1, 8, 3 * 144 + 4)[..., : 3 * 144], 8, 72)  # row stride % 8
    assert TemporalTile.of(1) == TemporalTile.of(16) == TemporalTile(16, 64, 64, 64, TemporalTile.of(1).num_warps)
    assert TemporalTile.of(17).TP == 32 and TemporalTile.of(64).TP == 64 and not TemporalTile.of(64).split_bwd
    long = TemporalTile.of(65)
    assert (long.TP, long.BLOCK, long.BLOCK_M, long.BLOCK_M_DKV) == (128, 128, 64, 32) and long.split_bwd
    assert TemporalTile.of(120) == TemporalTile.of(128) == long


@pytest.mark.parametrize("T", [2, 67])  # 67: the split (dK/dV, then dQ) backward inside the same custom op
def test_temporal_packed_kernel_compiles_fullgraph(temporal_launches, T):
    """torch.compile(fullgraph=True) traces the packed temporal custom ops, forward and backward."""
    S, H, D = 3, 2, 64
    qkv = randn(1, T * S, 3 * H * D, seed=41).requires_grad_()
    qw, kw = randn(D, seed=42).requires_grad_(), randn(D, seed=43).requires_grad_()
    cs = R.rope_cos_sin(T, D)

    def f(qkv, qw, kw):
        return self_attention(qkv, qw, kw, num_heads=H, num_frames=T, layout="temporal", rope=cs).sum()

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(qkv, qw, kw)
    out.backward()
    ref = R.self_attention_ref(qkv.detach(), qw.detach(), kw.detach(), H, T, "temporal", 1e-6, cs).sum()
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-4)
    assert qkv.grad is not None and qw.grad is not None and kw.grad is not None
    assert [c.n for c in temporal_launches] == [1, 1, int(T > 64)]


def test_temporal_packed_kernel_unaligned_view(temporal_launches):
    """A qkv view starting 8 bytes off a 16-byte boundary: copied once inside the op, same result."""
    T, S, H, D = 3, 5, 2, 64
    wide = randn(1, T * S, 3 * H * D + 8, seed=51)
    qkv = wide[..., 2 : 2 + 3 * H * D]
    assert qkv.data_ptr() % 16 != 0
    w = 1 + 0.3 * randn(D, seed=52)
    out = self_attention(qkv, w, w, num_heads=H, num_frames=T, layout="temporal")
    ref = R.self_attention_ref(qkv.double(), w.double(), w.double(), H, T, "temporal")
    assert_close_to_fp64(out, R.self_attention_ref(qkv, w, w, H, T, "temporal"), ref)
    assert temporal_launches[0].n == 1


def test_temporal_long_sequence_uses_generic_path(triton_backend, monkeypatch):
    """T = 129 > 128 frames: the generic flash schedule (RMSNorm + RoPE pre-pass), not the packed kernels."""
    from opensora_fast.kernels import attention as A

    fwd = _CountLaunches(A._temporal_attention_fwd_kernel)
    monkeypatch.setattr(A, "_temporal_attention_fwd_kernel", fwd)
    T, S, H, D = 129, 1, 1, 72
    qkv = randn(1, T * S, 3 * H * D, dtype=torch.float64, seed=61)
    qw = 1 + 0.3 * randn(D, dtype=torch.float64, seed=62)
    kw = 1 + 0.3 * randn(D, dtype=torch.float64, seed=63)
    cos, sin = R.rope_cos_sin(T, D, dtype=torch.float64)
    _check(
        lambda qkv, qw, kw: self_attention(qkv, qw, kw, num_heads=H, num_frames=T, layout="temporal",
                                           rope=(cos.float(), sin.float())),
        lambda qkv, qw, kw: R.self_attention_ref(qkv, qw, kw, H, T, "temporal", 1e-6, (cos, sin)),
        [qkv, qw, kw], torch.float32, ["dqkv", "dq_norm_weight", "dk_norm_weight"], "cpu",
    )  # fmt: skip
    assert fwd.n == 0

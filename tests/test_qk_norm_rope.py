"""qk_norm_rope: Triton (interpreter on CPU) vs fp64, forward and every gradient."""

import pytest
import torch
from _close import assert_close_to_fp64, randn
from opensora_fast.kernels import qk_norm_rope, reference


def _run(q, k, wq, wk, rope, cast, grads_out, backend, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    leaf = [t.detach().to(cast).requires_grad_() for t in (q, k, wq, wk)]
    if backend == "triton" and q.stride(-1) == 1 and not q.is_contiguous():
        # keep the strided layout: rebuild the view from a strided parent
        parent = randn(*q.shape[:-1], 2 * q.shape[-1], dtype=cast)
        parent[..., : q.shape[-1]] = q.to(cast)
        leaf[0] = parent.requires_grad_()
        qin = parent[..., : q.shape[-1]]
    else:
        qin = leaf[0]
    kw = {}
    if rope:
        cos, sin = reference.rope_cos_sin(q.shape[1], q.shape[-1], dtype=cast)
        kw = dict(cos=cos, sin=sin)
    outs = qk_norm_rope(qin, leaf[1], leaf[2], leaf[3], **kw)
    grads = torch.autograd.grad(outs, leaf, [g.to(cast) for g in grads_out])
    if qin is not leaf[0]:
        grads = (grads[0][..., : q.shape[-1]],) + grads[1:]
    return outs, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize(
    "B,N,H,D,strided",
    [(2, 5, 3, 72, False), (1, 1, 2, 64, True), (2, 7, 1, 40, False), (1, 3, 2, 128, True), (2, 3, 2, 14, True)],
)
def test_forward_backward(dtype, rope, B, N, H, D, strided, monkeypatch):
    q = randn(B, N, H, 2 * D, dtype=dtype)[..., :D] if strided else randn(B, N, H, D, dtype=dtype)
    k = randn(B, N, H, D, dtype=dtype, scale=3.0)
    wq, wk = randn(D, dtype=dtype), randn(D, dtype=dtype)
    gout = [randn(B, N, H, D, dtype=dtype) for _ in range(2)]
    outs, grads = _run(q, k, wq, wk, rope, dtype, gout, "triton", monkeypatch)
    outs_lp, grads_lp = _run(q, k, wq, wk, rope, dtype, gout, "reference", monkeypatch)
    outs_64, grads_64 = _run(q, k, wq, wk, rope, torch.float64, gout, "reference", monkeypatch)
    for name, o, lp, r in zip("qk", outs, outs_lp, outs_64):
        assert o.dtype == dtype and o.is_contiguous()
        assert_close_to_fp64(o, lp, r, name=f"{name} out")
    for name, g, lp, r in zip(("dq", "dk", "dq_weight", "dk_weight"), grads, grads_lp, grads_64):
        assert_close_to_fp64(g, lp, r, name=name, atol=None if name[-1] != "t" else 1e-4)


def test_rope_rotates_interleaved_pairs(triton_backend):
    """With unit weights and a constant-norm row, RoPE at position p rotates pair i by p * freq_i."""
    D = 8
    x = torch.zeros(1, 2, 1, D)
    x[..., 0::2] = 1.0  # rms = 1/sqrt(2): normalised row has pairs (sqrt2, 0)
    cos, sin = reference.rope_cos_sin(2, D)
    q, _ = qk_norm_rope(x, x, torch.ones(D), torch.ones(D), cos=cos, sin=sin, eps=0.0)
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2) / D)
    expect = torch.stack([torch.cos(inv), torch.sin(inv)], -1).flatten() * 2**0.5
    torch.testing.assert_close(q[0, 1, 0], expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q[0, 0, 0, 0::2], torch.full((D // 2,), 2**0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, w: qk_norm_rope(q[0], q, w, w), "q must have 4 dimensions"),
        (lambda q, w: qk_norm_rope(q, q[..., :4], w, w), "k must have shape"),
        (lambda q, w: qk_norm_rope(q, q, w[:3], w), r"q_weight must have shape \(8,\)"),
        (lambda q, w: qk_norm_rope(q, q, w, w, cos=torch.ones(3, 8)), "cos and sin"),
        (lambda q, w: qk_norm_rope(q, q, w, w, cos=torch.ones(3, 8), sin=torch.ones(3, 8)),
         r"cos must have shape \(5, 8\)"),
        (lambda q, w: qk_norm_rope(q.int(), q, w, w), "floating-point"),
    ],
)  # fmt: skip
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(randn(2, 5, 3, 8), randn(8))


def test_torch_compile_fullgraph(triton_backend):
    q, k = randn(2, 4, 2, 16).requires_grad_(), randn(2, 4, 2, 16).requires_grad_()
    w = randn(16).requires_grad_()
    cos, sin = reference.rope_cos_sin(4, 16)

    def f(q, k, w):
        a, b = qk_norm_rope(q, k, w, w, cos=cos, sin=sin)
        return (a * b).sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, w)
    torch.testing.assert_close(out, f(q, k, w))


@pytest.mark.gpu
@pytest.mark.parametrize("rope", [False, True])
def test_gpu_bf16_real_shapes(rope, monkeypatch):
    B, N, H, D = 2 * 3600, 30, 16, 72  # temporal attention at 720p: (B*S, T, heads, 72)
    dev, dt = "cuda", torch.bfloat16
    q, k = randn(B, N, H, D, dtype=dt, device=dev), randn(B, N, H, D, dtype=dt, device=dev)
    wq, wk = randn(D, dtype=dt, device=dev), randn(D, dtype=dt, device=dev)
    gout = [randn(B, N, H, D, dtype=dt, device=dev) for _ in range(2)]
    outs, grads = _run(q, k, wq, wk, rope, dt, gout, "triton", monkeypatch)
    outs_lp, grads_lp = _run(q, k, wq, wk, rope, dt, gout, "reference", monkeypatch)
    outs_64, grads_64 = _run(q, k, wq, wk, rope, torch.float64, gout, "reference", monkeypatch)
    for o, lp, r in zip(outs, outs_lp, outs_64):
        assert_close_to_fp64(o, lp, r)
    for g, lp, r in zip(grads, grads_lp, grads_64):
        assert_close_to_fp64(g, lp, r)


def _run_views(make, bases, dtype, backend, monkeypatch):
    """make(*leaves) -> outputs, with leaves the bases cast to dtype: outputs and the gradients of the
    first four bases (q, k and the two weight bases; the RoPE tables get none)."""
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    leaves = [b.detach().to(dtype).requires_grad_(i < 4) for i, b in enumerate(bases)]  # not cos / sin
    outs = make(*leaves)
    g = torch.Generator().manual_seed(5)
    gouts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype) for o in outs]
    need = [t for t in leaves if t.requires_grad]
    return outs, torch.autograd.grad(outs, need, gouts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_weights_and_rope_tables(dtype, monkeypatch):
    """Issue 13: q_weight a stride-2 view, k_weight an expanded scalar, sin broadcast over positions
    (stride (0, 1)) beside a dense cos (stride (D, 1)): the kernels read each through its own strides
    (the old kernel read weights as contiguous and sin with cos's row stride, past sin's storage) and the
    weights' gradients come back in their bases' shapes."""
    B, N, H, D = 2, 5, 3, 8
    bases = [
        randn(B, N, H, D, seed=1),
        randn(B, N, H, D, seed=2),
        randn(2 * D, seed=3),  # q_weight = base[::2]
        randn(1, seed=4),  # k_weight = base.expand(D)
        randn(N, D, seed=5),  # cos
        randn(1, D, seed=6),  # sin = base.expand(N, D)
    ]

    def make(q, k, wq2, wk1, cos, sin1):
        return qk_norm_rope(q, k, wq2[::2], wk1.expand(D), cos=cos, sin=sin1.expand(N, D))

    outs, grads = _run_views(make, bases, dtype, "triton", monkeypatch)
    outs_lp, grads_lp = _run_views(make, bases, dtype, "reference", monkeypatch)
    outs_64, grads_64 = _run_views(make, bases, torch.float64, "reference", monkeypatch)
    for name, o, lp, r in zip("qk", outs, outs_lp, outs_64):
        assert_close_to_fp64(o, lp, r, name=f"{name} out")
    names = ("dq", "dk", "dq_weight_base", "dk_weight_base")
    for name, g, lp, r in zip(names, grads, grads_lp, grads_64):
        assert g.shape == r.shape, name
        assert_close_to_fp64(g, lp, r, name=name, atol=None if "weight" not in name else 1e-4)


def test_output_dtypes_follow_their_inputs(monkeypatch):
    """Issue 13: q_out in q's dtype and k_out in k's, as the docstring says, on both backends."""
    q, k, w = randn(1, 3, 2, 8), randn(1, 3, 2, 8, dtype=torch.float16), randn(8)
    for backend in ("triton", "reference"):
        monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
        qo, ko = qk_norm_rope(q, k, w, w)
        assert (qo.dtype, ko.dtype) == (torch.float32, torch.float16), backend
    assert "k_out in k's" in qk_norm_rope.__doc__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_odd_head_dim_without_rope(dtype, monkeypatch):
    """D = 7: a 4-column head and a 3-of-4 masked tail (the column split's padded path)."""
    q, k = randn(2, 3, 2, 7, dtype=dtype), randn(2, 3, 2, 7, dtype=dtype, scale=2.0)
    wq, wk = randn(7, dtype=dtype), randn(7, dtype=dtype)
    gout = [randn(2, 3, 2, 7, dtype=dtype) for _ in range(2)]
    outs, grads = _run(q, k, wq, wk, False, dtype, gout, "triton", monkeypatch)
    outs_lp, grads_lp = _run(q, k, wq, wk, False, dtype, gout, "reference", monkeypatch)
    outs_64, grads_64 = _run(q, k, wq, wk, False, torch.float64, gout, "reference", monkeypatch)
    for name, o, lp, r in zip("qk", outs, outs_lp, outs_64):
        assert_close_to_fp64(o, lp, r, name=f"{name} out")
    for name, g, lp, r in zip(("dq", "dk", "dq_weight", "dk_weight"), grads, grads_lp, grads_64):
        assert_close_to_fp64(g, lp, r, name=name, atol=None if name[-1] != "t" else 1e-4)


def test_tiling_splits_columns_and_claims_alignment_only_when_checked():
    """The kernels' 16-byte hints (multiple_of on row offsets) are only claimed for aligned rows: D = 72 is
    a 64-column head + 8-column tail; a view starting one element in, or a row stride that is not a
    multiple of 16 bytes, runs the unhinted path."""
    from opensora_fast.kernels.qk_norm_rope import _tiling

    x = torch.zeros(2, 5, 3, 72, dtype=torch.bfloat16)
    cos = torch.zeros(5, 72)
    t = _tiling(x, cos, cos, (x,))
    assert (t["BLOCK_D0"], t["BLOCK_D1"], t["HAS_TAIL"], t["ALIGNED"]) == (64, 8, True, True)
    assert (t["VEC_X"], t["VEC_C"]) == (8, 4)
    assert _tiling(x[..., :64], None, None, (x[..., :64],))["HAS_TAIL"] is False
    wide = torch.zeros(2, 5, 3, 80, dtype=torch.bfloat16)
    assert _tiling(wide[..., 1:73], None, None, (wide[..., 1:73],))["ALIGNED"] is False  # data_ptr + 2 B
    odd = torch.zeros(2, 5, 3, 76, dtype=torch.bfloat16)[..., :72]  # head stride 152 B
    assert _tiling(odd, None, None, (odd,))["ALIGNED"] is False
    cos_odd = torch.zeros(5, 73)[:, :72]  # cos rows 292 B apart
    assert _tiling(x, cos_odd, cos_odd, (x,))["ALIGNED"] is False
    assert _tiling(x, cos.expand(5, 72)[:1].expand(5, 72), cos, (x,))["ALIGNED"] is True  # stride 0 rows


def test_unaligned_rows_skip_the_spilling_config():
    """BLOCK_R=64 x 4 warps spilled 128 B in the unaligned backward (sm_90, bf16, D=72): pruned there only."""
    import importlib

    import triton

    module = importlib.import_module("opensora_fast.kernels.qk_norm_rope")
    configs = list(module._CONFIGS)
    assert module._prune(configs, {}, ALIGNED=True) == configs
    kept = [(c.kwargs["BLOCK_R"], c.num_warps) for c in module._prune(configs, {}, ALIGNED=False)]
    assert (64, 4) not in kept and len(kept) == len(configs) - 1
    assert all(isinstance(c, triton.Config) for c in configs)

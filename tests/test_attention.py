"""Fused attention (flash_attn_func, self_attention, cross_attention): forward and every gradient of
the Triton kernels against the fp64 PyTorch reference (interpreter on CPU, tiny awkward shapes), input
validation, torch.compile tracing, and bf16 real shapes on a GPU."""

from __future__ import annotations

import pytest
import torch
from opensora_fast.kernels import cross_attention, flash_attn_func, self_attention
from opensora_fast.kernels import reference as R

from tests._close import assert_close_to_fp64, randn
from tests.test_attention_idempotent import repeat_launches  # noqa: F401 (fixture)

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
# launches a real call makes, recorded without running (kernels._record: Triton's own binder, sm_90)


def capture_launches():
    """``with capture_launches() as rec:`` records (never runs) the Triton launches made inside;
    ``rec.launches`` then holds one ``_record.Launch`` per launch and per autotune config."""
    from opensora_fast.kernels._record import recording

    return recording()


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


@pytest.mark.parametrize("n_split,causal,D", [(1, False, 72), (3, True, 72), (5, False, 72), (2, True, 128)])
def test_backward_key_splits(triton_backend, monkeypatch, n_split, causal, D):
    """The backward's dQ is summed over key splits (each split owns a partial): one split, three splits
    over three key blocks (causal, Nq > Nk: skipped query blocks are zero-filled) and more splits than key
    blocks (splits without any key block contribute zeros)."""
    from opensora_fast.kernels import attention as A

    monkeypatch.setattr(A, "_n_split", lambda p, max_lk, device: n_split)
    monkeypatch.setattr(A, "BWD_DESIGN", "fused")  # key splits are the fused backward's (the default: split)
    B, H = 1, 2
    q, k, v = (randn(B, n, H, D, dtype=torch.float64, seed=s) for s, n in ((1, 45), (2, 40), (3, 40)))
    _check(
        lambda q, k, v: flash_attn_func(q, k, v, causal=causal),
        lambda q, k, v: R.attention_ref(q, k, v, causal=causal),
        [q, k, v],
        torch.float32,
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
    _check_self_attention(dtype, D, layout, rope, B, T, S, seed=5)


def _check_self_attention(dtype, D, layout, rope, B, T, S, seed, H=2):
    """self_attention (fwd, d qkv, d norm weights) in ``dtype`` against fp64 on seeded random inputs."""
    qkv = randn(B, T * S, 3 * H * D, dtype=torch.float64, seed=seed)
    qw = 1 + 0.3 * randn(D, dtype=torch.float64, seed=seed + 1)
    kw = 1 + 0.3 * randn(D, dtype=torch.float64, seed=seed + 3)
    cos, sin = R.rope_cos_sin(S if layout == "spatial" else T, D, dtype=torch.float64)

    def kern(qkv, qw, kw, cos, sin):
        rp = (cos.float(), sin.float()) if rope else None
        return self_attention(qkv, qw, kw, num_heads=H, num_frames=T, layout=layout, rope=rp)

    def refn(qkv, qw, kw, cos, sin):
        return R.self_attention_ref(qkv, qw, kw, H, T, layout, 1e-6, (cos, sin) if rope else None)

    _check(kern, refn, [qkv, qw, kw, cos, sin], dtype, ["dqkv", "dq_norm_weight", "dk_norm_weight"], "cpu",
           grad_mask=[True, True, True, False, False])  # fmt: skip


@pytest.mark.parametrize("dtype,rope", [(torch.float32, True), (torch.float16, False)])
def test_self_attention_fused_backward_design(triton_backend, monkeypatch, dtype, rope):
    """The fused one-kernel backward (5 matmuls, fp32 dQ partials), selectable with ``BWD_DESIGN`` and kept
    for comparison (the default is the split design), against fp64 at the spatial layout."""
    from opensora_fast.kernels import attention as A

    monkeypatch.setattr(A, "BWD_DESIGN", "fused")
    _check_self_attention(dtype, 72, "spatial", rope, 2, 2, 19, seed=15)


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


@pytest.mark.parametrize(
    "dtype,n_qc,n_split",
    [(torch.float32, 2, None), (torch.float16, 3, None), (torch.float32, 4, None), (torch.float32, 6, 1),
     (torch.float16, 4, 1), (torch.float32, 1, 1)],
)  # fmt: skip
@pytest.mark.parametrize("design", ["split", "fused"])
def test_cross_attention_backward_query_chunks(triton_backend, monkeypatch, dtype, n_qc, n_split, design):
    """The cross-attention backward with its queries in n_qc chunks (each chunk a sequence of its own
    against a copy of its sample's text; d(kv) of the copies summed), in both backward designs; fused: with
    the default key splits (None) or one key split (every program runs all key blocks of its chunk); split
    (varlen dK/dV programs per key block of the longest text): same gradients as the reference."""
    from opensora_fast.kernels import attention as A

    monkeypatch.setattr(A, "BWD_DESIGN", design)
    chunks = []
    monkeypatch.setattr(A, "_cross_schedule", lambda B, H, N, lk, D, dev: chunks.append(n_qc) or (n_qc, n_split))
    H, D, lens, N = 2, 72, [5, 0, 40], 12
    q = randn(len(lens), N, H * D, dtype=torch.float64, seed=9)
    kv = randn(sum(lens), 2 * H * D, dtype=torch.float64, seed=10)
    _check(
        lambda q, kv: cross_attention(q, kv, lens, num_heads=H),
        lambda q, kv: R.cross_attention_ref(q, kv, lens, H),
        [q, kv],
        dtype,
        ["dq", "dkv"],
        "cpu",
    )
    assert chunks == [n_qc]


def test_cross_attention_backward_schedule():
    """On a GPU (132 SMs) the short-text backward runs one key split and enough query chunks for whole
    waves: 720p-2s (B 2, 16 heads, 54,000 queries, 300 keys) as 4 chunks x 1 split = 128 programs (the
    old schedule: 3 chunks x 3 key splits = 288 programs in 3 waves, 3 fp32 dQ partials of 497 MB)."""
    from opensora_fast.kernels import attention as A

    dev = torch.device("meta")
    cases = [(2, 16, 54000, 300, 72), (2, 16, 432000, 300, 72), (1, 16, 3600 * 8, 300, 72), (4, 16, 1590 * 15, 120, 72),
             (2, 8, 997, 77, 128), (2, 16, 30, 300, 72)]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(A, "sm_count", lambda device: 132)
        for design in ("split", "fused"):
            mp.setattr(A, "BWD_DESIGN", design)
            assert A._cross_schedule(2, 16, 54000, 300, 72, dev) == (4, 1)
            for B, H, N, lk, D in cases:
                n_qc, n_split = A._cross_schedule(B, H, N, lk, D, dev)
                # the programs that walk the queries: (chunk, sample, head) for the fused kernel, and per key
                # block of 64 for the split design's dK/dV kernel
                if design == "split":
                    bm, kb = 64, -(-lk // 64)
                else:
                    bm, kb = A._BWD_TABLE[A._dclass(D)][0].kwargs["BLOCK_M"], 1
                assert n_split == (1 if n_qc > 1 else None) and N % n_qc == 0 and (n_qc == 1 or N // n_qc >= bm)
                assert B * H * n_qc < 2**31
                # within 3% of the least whole-wave query blocks per SM, and no fewer chunks are
                work = {n: -(-B * H * n * kb // 132) * -(-(N // n) // bm) for n in range(1, max(1, N // bm) + 1)
                        if N % n == 0}  # fmt: skip
                least = min(work.values())
                assert work[n_qc] <= 1.03 * least
                assert all(work[n] > 1.03 * least for n in work if n < n_qc)
        mp.setattr(A, "sm_count", lambda device: None)
        assert A._cross_schedule(2, 16, 12, 300, 72, dev) == (2, None)


def test_cross_attention_backward_one_key_split_on_gpu(triton_backend, monkeypatch):
    """With a GPU's SM count the cross-attention backward launches one key split over query chunks, and its
    gradients stay right (interpreter; sm_count patched to 12: 3 samples x 2 heads x 2 chunks); the fused
    backward design, whose key splits these are."""
    from opensora_fast.kernels import attention as A

    monkeypatch.setattr(A, "BWD_DESIGN", "fused")
    seen = []
    launch = A._launch_bwd

    def spy(*args, **kwargs):
        seen.append((args[17].Z, kwargs.get("n_split")))
        return launch(*args, **kwargs)

    monkeypatch.setattr(A, "sm_count", lambda device: 12)
    monkeypatch.setattr(A, "_launch_bwd", spy)
    H, D, lens, N = 2, 72, [5, 0, 130], 128
    q = randn(len(lens), N, H * D, dtype=torch.float64, seed=19)
    kv = randn(sum(lens), 2 * H * D, dtype=torch.float64, seed=20)
    _check(
        lambda q, kv: cross_attention(q, kv, lens, num_heads=H),
        lambda q, kv: R.cross_attention_ref(q, kv, lens, H),
        [q, kv],
        torch.float32,
        ["dq", "dkv"],
        "cpu",
    )
    assert seen == [(2 * len(lens), 1)]


def test_cross_attention_one_key_split_idempotent(triton_backend, monkeypatch, repeat_launches):  # noqa: F811
    """The GPU schedule (sm_count patched to 12: 2 query chunks, one key split, so each program reads back its
    own fp32 dQ partial after its first key block) gives bit-identical results with every launch run 3 times
    (the fused backward design; the split design's chunked path: test_attention_idempotent)."""
    from opensora_fast.kernels import attention as A

    from tests.test_attention_idempotent import REPEATS, _run

    monkeypatch.setattr(A, "BWD_DESIGN", "fused")
    monkeypatch.setattr(A, "sm_count", lambda device: 12)
    H, lens = 2, [5, 0, 130]
    inputs = [randn(3, 128, H * 72, seed=21), randn(sum(lens), 2 * H * 72, seed=22)]
    fn = lambda q, kv: cross_attention(q, kv, lens, num_heads=H)  # noqa: E731
    assert A._cross_schedule(3, H, 128, 130, 72, torch.device("cpu")) == (2, 1)
    once = _run(fn, inputs)
    n_once = repeat_launches["launches"]
    repeat_launches["on"] = True
    again = _run(fn, inputs)
    assert repeat_launches["launches"] == (1 + REPEATS) * n_once
    for a, b in zip(once, again):
        assert not torch.isnan(a).any() and torch.equal(a, b)


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
    bwd_q = _CountLaunches(A._temporal_attention_bwd_q_kernel)
    bwd_kv = _CountLaunches(A._temporal_attention_bwd_kv_kernel)
    monkeypatch.setattr(A, "_temporal_attention_fwd_kernel", fwd)
    monkeypatch.setattr(A, "_temporal_attention_bwd_kernel", bwd)
    monkeypatch.setattr(A, "_temporal_attention_bwd_q_kernel", bwd_q)
    monkeypatch.setattr(A, "_temporal_attention_bwd_kv_kernel", bwd_kv)

    def generic(*args, **kwargs):
        raise AssertionError("the generic flash path ran for a shape the packed temporal kernels support")

    monkeypatch.setattr(A, "_launch_fwd", generic)
    monkeypatch.setattr(A, "_launch_bwd", generic)
    return fwd, bwd, bwd_q, bwd_kv


@pytest.mark.parametrize(
    "dtype,D,rope,B,T,S",
    [
        (torch.float32, 72, True, 2, 1, 5),  # T = 1; TP = 16, 4 sequences per tile, S % 4 != 0
        (torch.float16, 72, True, 1, 3, 6),
        (torch.float32, 64, False, 2, 5, 3),  # G > 1 packing with padded frames, one partial tile per b
        (torch.float16, 64, True, 1, 5, 7),
        (torch.float32, 72, False, 1, 17, 3),  # TP = 32: 2 sequences per tile
        (torch.float16, 72, True, 2, 17, 1),
        # 65..128 frames (TP = 128): one sequence per tile, split backward (dQ + delta, then dK/dV)
        (torch.float32, 72, True, 1, 67, 2),
        (torch.float16, 72, True, 1, 120, 1),  # Open-Sora's longest clip: 120 latent frames
        (torch.float32, 64, False, 2, 128, 1),  # exactly full tile
        (torch.float16, 64, True, 1, 93, 2),
    ],
)
def test_temporal_packed_kernel(temporal_launches, dtype, D, rope, B, T, S):
    _check_self_attention(dtype, D, "temporal", rope, B, T, S, seed=21)
    assert [c.n for c in temporal_launches] == [1, int(T <= 64), int(T > 64), int(T > 64)]


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
    assert TemporalTile.of(1) == TemporalTile.of(16) == TemporalTile(16, 64, 64, 4)
    # one warpgroup over a 64-row forward tile (N = 64 wgmma); 8 warps at TP = 128 (4 spilled on sm_90)
    assert TemporalTile.of(30).fwd_warps == TemporalTile.of(64).fwd_warps == 4 and TemporalTile.of(65).fwd_warps == 8
    assert TemporalTile.of(17).TP == 32 and TemporalTile.of(64).TP == 64 and not TemporalTile.of(64).split_bwd
    long = TemporalTile.of(65)
    assert (long.TP, long.BLOCK, long.BLOCK_M) == (128, 128, 64) and long.split_bwd
    assert TemporalTile.of(120) == TemporalTile.of(128) == long


@pytest.mark.parametrize("T", [2, 67])  # 67: the split (dQ, then dK/dV) backward inside the same custom op
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
    assert [c.n for c in temporal_launches] == [1, int(T <= 64), int(T > 64), int(T > 64)]


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


class _CaptureLaunches(_CountLaunches):
    """Counts launches and keeps each launch's arguments."""

    def __init__(self, kernel):
        super().__init__(kernel)
        self.args, self.kwargs = [], []

    def __getitem__(self, grid):
        launch = super().__getitem__(grid)

        def call(*args, **kwargs):
            self.args.append(args)
            self.kwargs.append(kwargs)
            return launch(*args, **kwargs)

        return call


def test_temporal_packed_kernel_unaligned_rope_tables(monkeypatch, temporal_launches):
    """cos / sin as views whose rows are not 16-byte aligned (row stride D + 1): the kernels load the
    tables with 16-byte vector hints, so the op hands them aligned copies; same result as fp64."""
    from opensora_fast.kernels import attention as A

    fwd, bwd = _CaptureLaunches(A._temporal_attention_fwd_kernel), _CaptureLaunches(A._temporal_attention_bwd_kernel)
    monkeypatch.setattr(A, "_temporal_attention_fwd_kernel", fwd)
    monkeypatch.setattr(A, "_temporal_attention_bwd_kernel", bwd)
    T, S, H, D = 5, 3, 2, 72
    cos64, sin64 = R.rope_cos_sin(T, D, dtype=torch.float64)
    wide = torch.full((2, T, D + 1), float("nan"), dtype=torch.float32)
    wide[0, :, 1:], wide[1, :, 1:] = cos64, sin64
    cos, sin = wide[0, :, 1:], wide[1, :, 1:]
    assert cos.stride(0) % 8 != 0
    qkv = randn(1, T * S, 3 * H * D, dtype=torch.float64, seed=53)
    w = 1 + 0.3 * randn(D, dtype=torch.float64, seed=54)
    q32 = qkv.float().requires_grad_()
    out = self_attention(q32, w.float(), w.float(), num_heads=H, num_frames=T, layout="temporal", rope=(cos, sin))
    gout = randn(*out.shape, seed=55)
    out.backward(gout)
    q64 = qkv.clone().requires_grad_()
    ref = R.self_attention_ref(q64, w, w, H, T, "temporal", 1e-6, (cos64, sin64))
    ref.backward(gout.double())
    ql = qkv.float().requires_grad_()
    low = R.self_attention_ref(ql, w.float(), w.float(), H, T, "temporal", 1e-6, (cos, sin))
    low.backward(gout)
    assert_close_to_fp64(out, low, ref)
    assert_close_to_fp64(q32.grad, ql.grad, q64.grad, name="dqkv")
    for launch in fwd.args + bwd.args:
        tables = [a for a in launch if isinstance(a, torch.Tensor) and a.shape == (T, D)]
        assert len(tables) == 2
        assert all(t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0 and t.stride(1) == 1 for t in tables)
    assert (len(fwd.args), len(bwd.args)) == (1, 1)


@pytest.mark.parametrize("T", [30, 67])
def test_temporal_packed_bwd_schedule(monkeypatch, temporal_launches, T):
    """Every query of a tile in one forward step (at TP = 128 too: 64x128 / 64x64 wgmma on 8 warps).
    Up to 64 frames: one backward kernel, no lse kept. 65..128 frames: the forward stores each row's lse and
    the backward is the dQ kernel (writing delta and the normalised queries) then the dK/dV kernel, two
    programs per tile each, 64 rows per program on 4 warps. Gradients against fp64 either way."""
    from opensora_fast.kernels import attention as A

    fwd = _CaptureLaunches(A._temporal_attention_fwd_kernel)
    bwd, bq, bkv = (_CaptureLaunches(getattr(A, f"_temporal_attention_bwd{k}_kernel")) for k in ("", "_q", "_kv"))
    for k, c in (("", bwd), ("_q", bq), ("_kv", bkv)):
        monkeypatch.setattr(A, f"_temporal_attention_bwd{k}_kernel", c)
    monkeypatch.setattr(A, "_temporal_attention_fwd_kernel", fwd)
    S, H, D = 2, 2, 72
    qkv = randn(1, T * S, 3 * H * D, dtype=torch.float64, seed=61)
    w = 1 + 0.3 * randn(D, dtype=torch.float64, seed=62)
    cos, sin = R.rope_cos_sin(T, D, dtype=torch.float64)

    def kern(qkv, w):
        return self_attention(qkv, w, w, num_heads=H, num_frames=T, layout="temporal", rope=(cos.float(), sin.float()))

    def refn(qkv, w):
        return R.self_attention_ref(qkv, w, w, H, T, "temporal", 1e-6, (cos, sin))

    _check(kern, refn, [qkv, w], torch.float32, ["dqkv", "dnorm_weight"], "cpu")
    assert len(fwd.kwargs) == 1
    assert fwd.kwargs[0]["BLOCK_M"] == fwd.kwargs[0]["BLOCK"]  # every query of the tile in one step
    assert fwd.kwargs[0]["STATS"] == (T > 64)
    if T > 64:
        assert (len(bwd.kwargs), len(bq.kwargs), len(bkv.kwargs)) == (0, 1, 1)
        for c in (bq, bkv):
            assert c.kwargs[0]["BLOCK_M"] == 64 and c.kwargs[0]["num_warps"] == 4 and c.kwargs[0]["BLOCK"] == 128
    else:
        assert (len(bwd.kwargs), len(bq.kwargs), len(bkv.kwargs)) == (1, 0, 0)


def test_temporal_forward_keeps_lse_only_for_a_backward(monkeypatch, temporal_launches):
    """65..128 frames: the forward stores each row's lse only when a backward can follow (grad enabled and an
    input requiring grad); sampling (no_grad) stores nothing, with the same output."""
    from opensora_fast.kernels import attention as A

    fwd = _CaptureLaunches(A._temporal_attention_fwd_kernel)
    monkeypatch.setattr(A, "_temporal_attention_fwd_kernel", fwd)
    T, S, H, D = 67, 2, 2, 64
    qkv = randn(1, T * S, 3 * H * D, seed=71)
    w = 1 + 0.3 * randn(D, seed=72)
    with torch.no_grad():
        a = self_attention(qkv.requires_grad_(), w, w, num_heads=H, num_frames=T, layout="temporal")
    b = self_attention(qkv.detach().requires_grad_(), w, w, num_heads=H, num_frames=T, layout="temporal")
    c = self_attention(qkv.detach(), w, w, num_heads=H, num_frames=T, layout="temporal")
    assert [kw["STATS"] for kw in fwd.kwargs] == [False, True, False]
    assert torch.equal(a, b.detach()) and torch.equal(a, c)


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


# --------------------------------------------------------------------------------------------
# launches as compiled: pointer types, 16-byte alignment, grid limits (captured, nothing runs)

_INT_POINTERS = {"CU_K"}  # pointer arguments the kernels load integers from


def _spatial_args(B=1, T=2, S=40, H=2, D=72, dtype=torch.float16):
    qkv = randn(B, T * S, 3 * H * D, dtype=dtype, seed=1)
    w = randn(D, dtype=dtype, seed=2)
    return qkv, w


def _capture_all_ops(dtype=torch.float16, D=72):
    """Launches of the forward and backward custom ops of spatial self-attention, flash_attn_func and
    cross-attention at the model's layout (qkv Linear output, head_dim 72), captured without running."""
    from opensora_fast.kernels import attention as A

    H, T, S = 2, 2, 40
    qkv, w = _spatial_args(T=T, S=S, H=H, D=D, dtype=dtype)
    out = randn(1, T * S, H * D, dtype=dtype, seed=3)
    lse = randn(T * H, S, seed=4)
    q4 = randn(2, 40, H, D, dtype=dtype, seed=5)
    q3 = randn(2, 40, H * D, dtype=dtype, seed=6)
    kv = randn(30, 2 * H * D, dtype=dtype, seed=7)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    scale = D**-0.5
    with capture_launches() as rec:
        A._self_fwd_op(qkv, w, w, None, None, H, T, "spatial", 1e-6, scale)
        A._self_bwd_op(out, qkv, w, w, None, None, out, lse, H, T, "spatial", 1e-6, scale)
        A._flash_fwd_op(q4, q4, q4, scale, False)
        A._flash_bwd_op(q4, q4, q4, q4, q4, randn(4, 40, seed=8), scale, False)
        A._cross_fwd_op(q3, kv, cu, 20, H, scale)
        A._cross_bwd_op(q3, q3, kv, cu, q3, randn(4, 40, seed=9), 20, H, scale)
    return rec.launches


def test_launches_type_integer_pointers_as_integers():
    """Triton's runtime binder, given the real launch arguments, types every pointer a kernel loads
    integers from (CU_K) as an integer pointer: an fp32 dummy made the non-varlen forward and backward
    (spatial self-attention, flash_attn_func) fail to compile for sm_90 ("initial value for n_k is of
    type int32 but the then block redefines it as fp32")."""
    launches = _capture_all_ops()
    assert launches
    seen = 0
    for launch in launches:
        sig = launch.signature
        for name in _INT_POINTERS & set(sig):
            seen += 1
            assert sig[name] in ("*i32", "*i64"), f"{launch.kernel}: {name} bound as {sig[name]}"
    assert seen >= 6


def test_model_layout_launches_are_16_byte_aligned():
    """At the model's layout (qkv Linear output, head_dim 72) every generic attention kernel launches with
    ALIGNED=True (16-byte vector loads); a qkv view 8 bytes off a 16-byte boundary gets ALIGNED=False."""
    launches = _capture_all_ops()
    flags = {(lc.kernel, lc.named().get("ALIGNED")) for lc in launches if "ALIGNED" in lc.named()}
    assert flags and all(a is True for _, a in flags), flags
    from opensora_fast.kernels import attention as A

    wide = randn(1, 80, 3 * 144 + 8, dtype=torch.float16, seed=1)
    qkv = wide[..., 4 : 4 + 3 * 144]
    w = randn(72, dtype=torch.float16, seed=2)
    with capture_launches() as rec:
        A._self_fwd_op(qkv, w, w, None, None, 2, 2, "spatial", 1e-6, 72**-0.5)
    assert [lc.named()["ALIGNED"] for lc in rec.launches if lc.kernel == "_qk_norm_rope_fwd_kernel"] == [False]


@pytest.mark.slow
def test_spatial_attention_sm90_vectorised():
    """Compiled for sm_90 from the captured launches (Triton's binder, not a hand-typed signature): the
    forward and backward at head_dim 72 use 16-byte global accesses and async copies, no 2-byte global
    accesses, no spills (needs TRITON_INTERPRET unset: run in a subprocess)."""
    import json
    import os
    import subprocess
    import sys

    kernels = ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")
    code = (
        "import json, torch\n"
        f"KERNELS = {kernels!r}\n"
        "from opensora_fast.kernels._sm90 import compile_launch\n"
        "from tests.test_attention import _capture_all_ops\n"
        "first = {}\n"
        "for lc in _capture_all_ops(torch.bfloat16):\n"
        "    first.setdefault(lc.kernel, lc)\n"
        "res = [compile_launch(first[k]) for k in KERNELS]\n"
        "print(json.dumps([dict(name=r.name, error=r.error, stack=r.sass.stack, widths=r.sass.global_widths)\n"
        "                  for r in res]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["name"].split("[")[0] for r in res} == set(kernels), res
    for r in res:  # widths in bytes: "LDG.16" is a 16-byte load
        w = r["widths"]
        assert not r["error"] and r["stack"] == 0, r
        assert not [k for k in w if int(k.split(".")[1]) <= 2], r
        assert w.get("LDG.16", 0) + w.get("LDGSTS.16", 0) > 0, r


def _expanded_empty(shape, dtype, device):
    """Stand-in for kernels._utils.empty at 720p: stride-0 views of one element (nothing runs)."""
    return torch.zeros(1, dtype=dtype, device=device).expand(*shape) if len(shape) else torch.zeros((), dtype=dtype)


@pytest.mark.parametrize("layout,T", [("spatial", 120), ("temporal", 120), ("temporal", 129)])
def test_grids_within_cuda_limits_at_720p(monkeypatch, layout, T):
    """720p 16 s (T' = 120 latent frames, S = 3600 tokens per frame), batch 2, 16 heads of 72: every launch
    of the self-attention forward and backward (spatial; temporal packed; the generic temporal fallback
    for T > 128) and of cross-attention over all 120 * 3600 tokens keeps x < 2^31 and y, z <= 65535."""
    from opensora_fast.kernels import attention as A

    monkeypatch.setattr(A, "empty", _expanded_empty)
    B, S, H, D = 2, 3600, 16, 72
    C = H * D
    qkv = torch.zeros(1, 1, 3 * C, dtype=torch.bfloat16).expand(B, T * S, 3 * C)
    out = torch.zeros(1, 1, C, dtype=torch.bfloat16).expand(B, T * S, C)
    w = torch.ones(D, dtype=torch.bfloat16)
    cos = sin = torch.ones(T, D)
    L, Z = (S, B * T) if layout == "spatial" else (T, B * S)
    lse = torch.zeros(1, 1).expand(Z * H, L)
    scale = D**-0.5
    with capture_launches() as rec:
        if layout == "temporal" and A.temporal_supported(qkv, T, D):
            _, tlse = A._temporal_fwd_op(qkv, w, w, cos, sin, H, T, 1e-6, scale, True)
            A._temporal_bwd_op(out, qkv, w, w, cos, sin, out, tlse, H, T, 1e-6, scale)
        else:
            rope = (cos, sin) if layout == "temporal" else (None, None)
            A._self_fwd_op(qkv, w, w, *rope, H, T, layout, 1e-6, scale)
            A._self_bwd_op(out, qkv, w, w, *rope, out, lse, H, T, layout, 1e-6, scale)
        if layout == "spatial":
            kv = torch.zeros(1, 2 * C, dtype=torch.bfloat16).expand(600, 2 * C)
            cu = torch.tensor([0, 300, 600], dtype=torch.int32)
            A._cross_fwd_op(out, kv, cu, 300, H, scale)
            A._cross_bwd_op(out, out, kv, cu, out, torch.zeros(1, 1).expand(B * H, T * S), 300, H, scale)
    assert rec.launches
    for launch in rec.launches:
        x, y, z = launch.grid
        assert 0 < x < 2**31 and y <= 65535 and z <= 65535, (launch.kernel, (x, y, z))


# --------------------------------------------------------------------------------------------
# cross-attention: autotune key bucket, cached cu_seqlens, stride-0 kv, empty batches


def test_cross_attention_autotune_key_is_bucketed():
    """Caption lengths 117 and 120 (same power-of-two bucket) give the same autotune key values."""
    from opensora_fast.kernels import attention as A

    H, D = 2, 72
    q = randn(2, 40, H * D, dtype=torch.float16, seed=1)
    keys = []
    for lens in ([117, 3], [120, 0]):
        kv = randn(sum(lens), 2 * H * D, dtype=torch.float16, seed=2)
        with capture_launches() as rec:
            A._cross_fwd_op(q, kv, A.cu_seqlens(lens, "cpu"), max(lens), H, D**-0.5)
        args = [lc.named() for lc in rec.launches if lc.kernel == "_attention_fwd_kernel"][0]
        keys.append(tuple(args[k] for k in A._FWD_KEY))
    assert keys[0] == keys[1]
    assert A._lk_bucket(117) == A._lk_bucket(128) == 128 and A._lk_bucket(129) == 256


def test_cross_attention_cu_seqlens_cached(monkeypatch, triton_backend):
    """The cumulative lengths are built once per (lengths, device) and reused: no new host->device tensor
    on later calls with the same lengths."""
    from opensora_fast.kernels import attention as A

    A._CU_CACHE.clear()
    made = []
    real = torch.tensor

    def counting_tensor(*args, **kwargs):
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting_tensor)
    a = A.cu_seqlens([3, 0, 5], "cpu")
    b = A.cu_seqlens((3, 0, 5), torch.device("cpu"))
    assert a is b and len(made) == 1 and a.dtype == torch.int32 and a.tolist() == [0, 3, 3, 8]
    assert A.cu_seqlens([3, 1, 5], "cpu").tolist() == [0, 3, 4, 9] and len(made) == 2


def test_cross_attention_expanded_kv(triton_backend):
    """kv as a stride-0 expansion of one row: d(kv) lands in the right rows (was indexed by row // 0)."""
    H, D = 2, 16
    C = H * D
    lens = [3, 4]
    q = randn(2, 5, C, dtype=torch.float64, seed=1)
    row = randn(1, 2 * C, dtype=torch.float64, seed=2)
    g = randn(2, 5, C, dtype=torch.float64, seed=3)

    def grads(fn, dtype):
        ql, rl = q.to(dtype).requires_grad_(), row.to(dtype).requires_grad_()
        fn(ql, rl.expand(sum(lens), 2 * C)).backward(g.to(dtype))
        return ql.grad, rl.grad

    kern = grads(lambda q, kv: cross_attention(q, kv, lens, num_heads=H), torch.float32)
    lowp = grads(lambda q, kv: R.cross_attention_ref(q, kv, lens, H), torch.float32)
    hi = grads(lambda q, kv: R.cross_attention_ref(q, kv, lens, H), torch.float64)
    for n, a, b, c in zip(("dq", "dkv"), kern, lowp, hi):
        assert_close_to_fp64(a, b, c, name=n)


def test_empty_batch_triton_path(triton_backend):
    """B = 0: empty outputs and empty (or zero) gradients, no crash: spatial, temporal, cross."""
    H, D, T, S = 2, 16, 3, 4
    w = randn(D, seed=1).requires_grad_()
    for layout in ("spatial", "temporal"):
        qkv = torch.zeros(0, T * S, 3 * H * D).requires_grad_()
        out = self_attention(qkv, w, w, num_heads=H, num_frames=T, layout=layout)
        assert out.shape == (0, T * S, H * D)
        out.sum().backward()
        assert qkv.grad.shape == qkv.shape and torch.equal(w.grad, torch.zeros(D))
    q = torch.zeros(0, 5, H * D).requires_grad_()
    kv = torch.zeros(0, 2 * H * D).requires_grad_()
    out = cross_attention(q, kv, [], num_heads=H)
    assert out.shape == (0, 5, H * D)
    out.sum().backward()
    assert q.grad.shape == q.shape and kv.grad.shape == kv.shape


def test_bool_kv_lens_refused():
    q, kv = torch.randn(2, 5, 32), torch.randn(1, 64)
    with pytest.raises(ValueError, match="kv_lens"):
        cross_attention(q, kv, torch.tensor([True, False]), num_heads=2)
    with pytest.raises(ValueError, match="kv_lens"):
        cross_attention(q, kv, [True, False], num_heads=2)


def test_spatial_normalises_qk_once_and_backward_designs(monkeypatch):
    """Spatial self-attention: q/k RMSNorm runs once in a pre-pass (the forward kernel no longer normalises
    K inside its K loop, once per query block). The backward is, by default ("split"), a dK/dV kernel with
    four products per (key block, query block) pair (S^T, dV, dP^T, dK) and a dQ kernel with three (S, dP,
    dQ), each plus its second head-dim piece; "fused" is one kernel with five (S^T, dV, dP^T, dK, dQ)."""
    import inspect
    import re

    from opensora_fast.kernels import attention as A

    qkv, w = _spatial_args()
    out, lse = randn(1, 80, 144, dtype=torch.float16, seed=3), randn(4, 40, seed=4)
    with capture_launches() as fwd:
        A._self_fwd_op(qkv, w, w, None, None, 2, 2, "spatial", 1e-6, 72**-0.5)
    assert [lc.kernel for lc in fwd.launches] == ["_qk_norm_rope_fwd_kernel", "_attention_fwd_kernel"]
    want = {
        "split": {"_attention_bwd_dkdv_kernel": 8, "_attention_bwd_dq_kernel": 6},
        "fused": {"_attention_bwd_kernel": 10},
    }
    assert A.BWD_DESIGN == "split"
    for design, dots_want in want.items():
        monkeypatch.setattr(A, "BWD_DESIGN", design)
        with capture_launches() as bwd:
            A._self_bwd_op(out, qkv, w, w, None, None, out, lse, 2, 2, "spatial", 1e-6, 72**-0.5)
        dots = {lc.kernel: len(re.findall(r"tl\.dot\(", inspect.getsource(lc.fn.fn))) for lc in bwd.launches}
        assert {n: d for n, d in dots.items() if d} == dots_want

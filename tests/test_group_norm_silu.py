"""group_norm_silu: Triton (interpreter on CPU) forward and dx/dweight/dbias against fp64 references."""

import importlib

import pytest
import torch
from _close import assert_close_to_fp64, randn
from opensora_fast.kernels import group_norm_silu, reference


def _layout(t, layout):
    if layout != "channels_last":
        return t
    return t.to(memory_format=torch.channels_last_3d if t.dim() == 5 else torch.channels_last)


def _run(shape, groups, layout, silu, dtype, device, offset=3.0, dy_layout="contiguous", sliced=False):
    """Kernel vs same-precision and fp64 references: output, dx, dweight, dbias. x has a mean offset
    (offset) larger than its spread, which a one-pass E[x^2] - E[x]^2 variance would get wrong."""
    C = shape[1]
    full = (*shape[:-1], 2 * shape[-1]) if sliced else shape
    x64 = randn(*full, dtype=torch.float64, device=device, scale=2.0) + offset
    if sliced:  # a strided view: the kernels must read it through its strides
        x64 = x64[..., ::2]
    w64 = randn(C, dtype=torch.float64, device=device)
    b64 = randn(C, dtype=torch.float64, device=device)
    dy = _layout(randn(*shape, dtype=torch.float64, device=device), dy_layout)
    results = {}
    for tag, dt in (("kernel", dtype), ("lowp", dtype), ("fp64", torch.float64)):
        x = _layout(x64.to(dt), layout).requires_grad_()
        w, b = w64.to(dt).requires_grad_(), b64.to(dt).requires_grad_()
        if tag == "kernel":
            y = group_norm_silu(x, w, b, groups, silu=silu)
        else:
            y = reference.group_norm_silu_ref(x, w, b, groups, silu=silu)
        y.backward(dy.to(dt))
        results[tag] = (y, x.grad, w.grad, b.grad)
    out = results["kernel"]
    if not sliced:
        assert out[0].stride() == _layout(x64, layout).stride(), "output must keep x's memory format"
    for i, name in enumerate(("out", "dx", "dweight", "dbias")):
        assert out[i].dtype == dtype, f"{name} dtype {out[i].dtype}"
        assert_close_to_fp64(out[i], results["lowp"][i], results["fp64"][i], name=name)


# (shape, groups, layout, silu, dy layout): C/G = 2 / 5 (not a power of 2) / 4; T=1, T=17, odd H/W; 4-D input;
# S = 1800 > 1024 positions (statistics split across programs and merged).
# The kernels' LAYOUT: 1 when x, dy (and the outputs) are channels-last, 2 when contiguous, 0 (any
# strides) when they differ or x is a strided view.
CASES = [
    ((2, 8, 3, 5, 7), 4, "contiguous", True, "contiguous"),
    ((2, 20, 1, 3, 3), 4, "channels_last", True, "channels_last"),
    ((1, 12, 17, 2, 3), 3, "channels_last", False, "contiguous"),
    ((1, 6, 5, 5), 2, "channels_last", True, "channels_last"),
    ((2, 6, 3, 5), 3, "contiguous", True, "channels_last"),
    ((1, 8, 3, 20, 30), 2, "contiguous", True, "contiguous"),
    ((1, 8, 2, 25, 27), 4, "channels_last", True, "channels_last"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "case", CASES, ids=[f"{'x'.join(map(str, c[0]))}-G{c[1]}-{c[2]}-silu{int(c[3])}-dy_{c[4]}" for c in CASES]
)
def test_group_norm_silu_matches_fp64(triton_backend, device, case, dtype):
    shape, groups, layout, silu, dy_layout = case
    _run(shape, groups, layout, silu, dtype, device, dy_layout=dy_layout)


def test_group_norm_silu_strided_view(triton_backend, device):
    _run((2, 6, 3, 4, 5), 3, "contiguous", True, torch.float32, device, sliced=True)


def test_group_norm_silu_large_offset_fp32(triton_backend, device):
    """mean 1000 x std 1: the chunked Chan merge keeps the variance exact enough in fp32."""
    _run((1, 4, 2, 30, 40), 2, "channels_last", True, torch.float32, device, offset=1000.0)


@pytest.mark.parametrize(
    "groups, shape, match",
    [
        (3, (2, 8, 3, 4, 4), "num_groups"),
        (0, (2, 8, 3, 4, 4), "num_groups"),
        (4, (2, 8, 4), "x must have 4 or 5"),
    ],
)
def test_group_norm_silu_rejects_bad_input(device, groups, shape, match):
    x = torch.randn(shape, device=device)
    w, b = torch.randn(8, device=device), torch.randn(8, device=device)
    with pytest.raises(ValueError, match=match):
        group_norm_silu(x, w, b, groups)


def test_group_norm_silu_rejects_bad_weight(device):
    x = torch.randn(2, 8, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="weight"):
        group_norm_silu(x, torch.randn(4, device=device), torch.randn(8, device=device), 4)


def test_group_norm_silu_torch_compile_fullgraph(triton_backend, device):
    x = randn(2, 8, 3, 4, 5, device=device).to(memory_format=torch.channels_last_3d).requires_grad_()
    w, b = randn(8, device=device).requires_grad_(), randn(8, device=device).requires_grad_()
    fn = torch.compile(lambda x, w, b: group_norm_silu(x, w, b, 4).square().sum(), fullgraph=True, backend="aot_eager")
    fn(x, w, b).backward()
    grads = [t.grad for t in (x, w, b)]
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    reference.group_norm_silu_ref(x64, w64, b64, 4).square().sum().backward()
    for g, r, name in zip(grads, (x64.grad, w64.grad, b64.grad), ("dx", "dweight", "dbias")):
        assert_close_to_fp64(g, g, r, name=name)


# Temporal VAE shapes (opensora-v1.2.md §3.3: GroupNorm 32), bf16 on the GPU.
GPU_CASES = [
    ((1, 128, 17, 90, 160), "channels_last"),
    ((1, 256, 17, 90, 160), "contiguous"),
    ((1, 512, 5, 45, 80), "channels_last"),
    ((2, 512, 5, 45, 80), "contiguous"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, layout", GPU_CASES, ids=[f"{'x'.join(map(str, s))}-{l}" for s, l in GPU_CASES])
def test_group_norm_silu_bf16_real_shapes(triton_backend, shape, layout):
    _run(shape, 32, layout, True, torch.bfloat16, "cuda", offset=0.5, dy_layout=layout)


def test_group_norm_silu_layout_modes():
    """The packed fast paths are chosen exactly when every tensor shares x's packed strides."""
    from opensora_fast.kernels.group_norm_silu import _layout

    x = torch.randn(2, 8, 3, 4, 5)
    cl = x.to(memory_format=torch.channels_last_3d)
    assert _layout((x, torch.empty_like(x)))[0] == 2
    assert _layout((cl, torch.empty_like(cl)))[0] == 1
    assert _layout((cl, x))[0] == 0
    assert _layout((x[..., ::2],))[0] == 0
    x4 = torch.randn(2, 8, 4, 5).to(memory_format=torch.channels_last)
    assert _layout((x4,))[0] == 1


def test_group_norm_silu_configs_pruned_by_layout():
    """Packed layouts autotune over every config; any-strides runs the first (the gate's sets)."""
    module = importlib.import_module("opensora_fast.kernels.group_norm_silu")
    configs = ["a", "b"]
    assert module._prune(configs, {}, LAYOUT=1) == configs
    assert module._prune(configs, {}, LAYOUT=2) == configs
    assert module._prune(configs, {}, LAYOUT=0) == ["a"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_strided_weight_and_bias(layout, monkeypatch):
    """Issue 13: weight a stride-2 view, bias an expanded scalar: read through their strides (the old
    kernels read both as contiguous), gradients back in their bases' shapes."""
    C = 8
    x_b, w_b, b_b = randn(2, C, 3, 4, 5, seed=1, scale=2.0), randn(2 * C, seed=2), randn(1, seed=3)
    dy = randn(2, C, 3, 4, 5, seed=4)

    def run(backend, dt):
        monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
        leaves = [t.detach().to(dt).requires_grad_() for t in (x_b, w_b, b_b)]
        y = group_norm_silu(_layout(leaves[0], layout), leaves[1][::2], leaves[2].expand(C), 4)
        return (y, *torch.autograd.grad(y, leaves, dy.to(dt)))

    got, lowp, ref = run("triton", torch.float32), run("reference", torch.float32), run("reference", torch.float64)
    for name, g, lp, r in zip(("out", "dx", "dweight_base", "dbias_base"), got, lowp, ref):
        assert g.shape == r.shape, name
        assert_close_to_fp64(g, lp, r, name=name, atol=1e-4)


def test_backward_with_dy_in_other_format_runs_packed_layout(monkeypatch):
    """x channels_last_3d with a contiguous upstream gradient: dy is copied to x's format once, so the
    backward kernels run the packed channels-last layout (LAYOUT 1), not the any-strides one; same grads."""
    from triton.runtime.autotuner import Autotuner

    seen = []
    real = Autotuner.run

    def spy(self, *args, **kwargs):
        seen.append((self.base_fn.__name__, kwargs.get("LAYOUT")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", spy)
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "triton")
    x = randn(2, 8, 3, 4, 5, seed=1).to(memory_format=torch.channels_last_3d).requires_grad_()
    w, b = randn(8, seed=2).requires_grad_(), randn(8, seed=3).requires_grad_()
    dy = randn(2, 8, 3, 4, 5, seed=4)  # contiguous
    got = torch.autograd.grad(group_norm_silu(x, w, b, 4), (x, w, b), dy)
    assert [lay for name, lay in seen if "bwd" in name] == [1, 1], seen
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad(reference.group_norm_silu_ref(x64, w64, b64, 4), (x64, w64, b64), dy.double())
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    x32, w32, b32 = (t.detach().requires_grad_() for t in (x, w, b))
    lowp = torch.autograd.grad(group_norm_silu(x32, w32, b32, 4), (x32, w32, b32), dy)
    for name, g, lp, r in zip(("dx", "dweight", "dbias"), got, lowp, want):
        assert_close_to_fp64(g, lp, r, name=name, atol=1e-4)


@pytest.mark.parametrize("mag", [1e19, 1e30, 1e37])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_huge_values_do_not_overflow_statistics(mag, layout, monkeypatch):
    """|x| >= ~1e19 overflowed the fp32 sums of squares (rstd 0: the output was silu(bias)). The chunk
    moments are now held as M2 / 4**e with 2**e <= max|x| and merged across exponents, so fp32 inputs up to
    ~1e37 normalise like the fp64 reference, gradients too. S = 1350 positions: two chunks are merged, and
    the first frame is 1e6 times smaller than the rest (partials with different exponents)."""
    shape = (1, 8, 2, 25, 27)
    x = randn(*shape, seed=1, dtype=torch.float64) * mag
    x[:, :, 0] *= 1e-6
    x = x.float().double()  # exactly representable in fp32
    w, b = randn(8, seed=2, dtype=torch.float64), randn(8, seed=3, dtype=torch.float64)
    dy = randn(*shape, seed=4, dtype=torch.float64)

    def run(dt):
        leaves = [_layout(x.to(dt), layout).requires_grad_(), w.to(dt).requires_grad_(), b.to(dt).requires_grad_()]
        y = group_norm_silu(*leaves, 4)
        return (y, *torch.autograd.grad(y, leaves, _layout(dy.to(dt), layout)))

    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    want = run(torch.float64)
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "triton")
    got = run(torch.float32)
    for i, (g, r) in enumerate(zip(got, want)):
        assert g.isfinite().all(), f"result {i}: non-finite"
        err = (g.double() - r).abs().max().item()
        assert err <= 1e-4 * max(r.abs().max().item(), 1e-30) + (1e-4 if i == 0 else 0.0), (i, err)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_overflow_fixup_mixed_groups_and_nan(layout, monkeypatch):
    """Issue 9: the statistics pass uses plain moments and redoes a chunk with the scaled ones only when a
    group's M2 or mean is not finite. One program holding an ordinary, a 1e30 and a 1e-3 group (and, in the
    other sample, a NaN): the finite groups equal the fp64 reference, the NaN group is NaN, no other."""
    shape = (2, 8, 3, 5, 7)
    x = randn(*shape, seed=1, dtype=torch.float64) + 2.0
    x[:, 2:4] *= 1e30
    x[:, 4:6] *= 1e-3
    x = x.float().double()
    w, b = randn(8, seed=2, dtype=torch.float64), randn(8, seed=3, dtype=torch.float64)
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    want = group_norm_silu(x, w, b, 4)
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "triton")
    xf = x.float()
    xf[1, 6, 1, 2, 3] = float("nan")
    got = group_norm_silu(_layout(xf, layout), w.float(), b.float(), 4).double()
    assert got[1, 6:8].isnan().all()
    got[1, 6:8], want[1, 6:8] = 0.0, 0.0
    assert got.isfinite().all()
    err = (got - want).abs().amax(dim=(2, 3, 4))
    assert (err <= 1e-4 * want.abs().amax(dim=(2, 3, 4)) + 1e-4).all(), err.max().item()


@pytest.mark.slow
def test_stats_kernel_sm90_loop_is_the_plain_one():
    """Issue 9: the power-of-two scaled moments (fc8b5df) put a max|x| reduction and log2 / exp2 into every
    tile of the statistics pass (sm_90, bf16 channels-last 512 channels / 32 groups, TILE 2048 x 4 warps:
    699 instructions, 200 LSU-unit ones, 12 MUFU per tile); the plain two-pass tile loop that followed still
    reduced across threads twice per tile (<= 450 instructions). The whole-tile loop is now a per-element
    Welford update (115 instructions at TILE 2048 and 4096, one MUFU for 1 / k, no cross-thread
    reduction): <= 160 and <= 1 MUFU; the scaled moments run in a separate loop over quarter tiles, only after
    an overflow or a non-finite input. No spills."""
    from tests._sass import launch_loops

    setup = """
G = importlib.import_module("opensora_fast.kernels.group_norm_silu")
x = torch.randn(1, 512, 2, 16, 16).bfloat16().to(memory_format=torch.channels_last_3d)
w = torch.randn(512).bfloat16()
with recording() as rec:
    G._fwd_impl(x, w.float(), w.float(), 32, 1e-6, True)
launches = rec.launches
"""
    res = launch_loops(setup, "_group_norm_silu_stats_kernel", ("TILE",))
    assert [r["TILE"] for r in res] == [4096, 2048], res
    for r in res:
        assert r["stack"] == 0 and len(r["loops"]) == 2, r
        hot = r["loops"][0]  # address order: the whole-tile loop, then the rare scaled-moments loop
        assert hot["size"] <= 160 and hot["mufu"] <= 1, r

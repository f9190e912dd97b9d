"""causal_conv3d: Triton (interpreter on CPU) forward and dx/dweight/dbias against fp64 references."""

import importlib

import pytest
import torch
from _close import assert_close_to_fp64, randn
from opensora_fast.kernels import causal_conv3d, reference

CL = torch.channels_last_3d


def _leaf(t, dtype, layout=None):
    t = t.detach().to(dtype)
    if layout == "channels_last":
        t = t.to(memory_format=CL)
    return t.requires_grad_()


def _run(B, C_in, C_out, T, H, W, k, stride_t, layout, has_bias, dtype, device, sliced=False, dy_layout=None):
    """Kernel vs same-precision and fp64 references: output, dx, dweight, dbias."""
    x64 = randn(B, C_in, T, H, 2 * W if sliced else W, dtype=torch.float64, device=device)
    if sliced:  # a strided view: the kernel must read through strides, no copy
        x64 = x64[..., ::2]
    w64 = randn(C_out, C_in, k, k, k, dtype=torch.float64, device=device, scale=(C_in * k**3) ** -0.5)
    b64 = randn(C_out, dtype=torch.float64, device=device) if has_bias else None
    stride = (stride_t, 1, 1)
    results = {}
    for tag, dt in (("kernel", dtype), ("lowp", dtype), ("fp64", torch.float64)):
        x = _leaf(x64, dt, layout) if not sliced else x64.to(dt).requires_grad_()
        w = _leaf(w64, dt)
        b = None if b64 is None else _leaf(b64, dt)
        fn = causal_conv3d if tag == "kernel" else reference.causal_conv3d_ref
        y = fn(x, w, b, stride=stride) if tag == "kernel" else fn(x, w, b, stride)
        if "dy" not in results:
            results["dy"] = randn(*y.shape, dtype=torch.float64, device=device)
        dy = results["dy"].to(dt)  # contiguous unless dy_layout says otherwise, whatever y's format
        y.backward(dy.to(memory_format=CL) if dy_layout == "channels_last" else dy)
        results[tag] = (y, x.grad, w.grad, None if b is None else b.grad)
    out = results["kernel"]
    if layout == "channels_last" and not sliced:
        assert out[0].is_contiguous(memory_format=CL), "output must keep x's channels_last_3d format"
    for i, name in enumerate(("out", "dx", "dweight", "dbias")):
        if out[i] is None:
            continue
        assert out[i].dtype == dtype, f"{name} dtype {out[i].dtype}"
        assert_close_to_fp64(out[i], results["lowp"][i], results["fp64"][i], name=name)


# (B, C_in, C_out, T, H, W, k, stride_t, layout, bias): T=1 / T=17, odd H/W, C_in 3/5/20/70 (not a
# block multiple, 70 > BLOCK_K), C_out 130 > BLOCK_N, M > BLOCK_M, 3x3x3 / 1x1x1, stride 1 / 2.
CASES = [
    (1, 3, 5, 5, 3, 4, 3, 1, "contiguous", True),
    (2, 5, 20, 6, 3, 3, 3, 2, "channels_last", True),
    (1, 20, 7, 1, 5, 3, 1, 1, "channels_last", False),
    (1, 5, 4, 17, 2, 3, 3, 1, "contiguous", False),
    (1, 4, 6, 1, 3, 5, 3, 1, "channels_last", True),
    (1, 3, 4, 17, 1, 3, 3, 2, "channels_last", False),
    (1, 3, 5, 9, 4, 5, 3, 2, "contiguous", True),
    (1, 70, 130, 2, 1, 3, 3, 1, "channels_last", True),
    (2, 5, 3, 3, 5, 5, 1, 1, "contiguous", True),
]


# every case in fp32, the first six (both layouts, both strides, both kernel sizes) also in fp16
PARAMS = [(c, torch.float32) for c in CASES] + [(c, torch.float16) for c in CASES[:6]]


@pytest.mark.parametrize(
    "case, dtype",
    PARAMS,
    ids=[f"{c[1]}to{c[2]}-T{c[3]}-{c[4]}x{c[5]}-k{c[6]}s{c[7]}-{c[8]}-{str(d)[6:]}" for c, d in PARAMS],
)
def test_causal_conv3d_matches_fp64(triton_backend, device, case, dtype):
    _run(*case, dtype=dtype, device=device)


def test_causal_conv3d_strided_view_input(triton_backend, device):
    _run(1, 5, 6, 5, 3, 4, 3, 1, None, True, torch.float32, device, sliced=True)


def test_causal_conv3d_dw_split_over_m(triton_backend, device, monkeypatch):
    """dW reduced over several M-chunks (at real shapes from 4096 rows; lowered here to 64)."""
    module = importlib.import_module("opensora_fast.kernels.causal_conv3d")

    monkeypatch.setattr(module, "_DW_ROWS_PER_SPLIT", 64)
    assert module._dw_split(150, 3, 4, 27) == 3
    _run(1, 3, 4, 6, 5, 5, 3, 1, "channels_last", True, torch.float32, device)


def test_causal_conv3d_fast_channels_last(triton_backend, device):
    """C_in = C_out = 128, channels-last x and dy: the FAST specialisation of all three kernels."""
    from opensora_fast.kernels.causal_conv3d import _fast

    x = torch.randn(1, 128, 2, 2, 3).to(memory_format=CL)
    assert _fast((x, x), 128, 128) and not _fast((x.contiguous(), x), 128, 128)
    _run(1, 128, 128, 2, 2, 3, 3, 1, "channels_last", True, torch.float16, device, dy_layout="channels_last")


def test_causal_conv3d_no_input_grad(triton_backend, device):
    x = randn(1, 3, 4, 3, 3, device=device)
    w = randn(4, 3, 3, 3, 3, device=device).requires_grad_()
    causal_conv3d(x, w).sum().backward()
    w64 = w.detach().double().requires_grad_()
    reference.causal_conv3d_ref(x.double(), w64).sum().backward()
    assert_close_to_fp64(w.grad, w.grad, w64.grad, name="dweight")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=(6, 4, 3, 3, 3)), "weight"),
        (dict(bias=(5,)), "bias"),
        (dict(stride=(1, 2, 1)), "stride"),
        (dict(stride=2), "stride"),
        (dict(padding_mode="replicate"), "padding_mode"),
        (dict(weight=(6, 3, 3, 2, 2)), "odd"),
        (dict(x=(1, 3, 4, 5)), "x must have 5"),
        (dict(weight=(6, 3, 1, 1, 1), stride=(2, 1, 1)), "k_t"),
    ],
)
def test_causal_conv3d_rejects_bad_input(device, kwargs, match):
    x = torch.randn(kwargs.pop("x", (1, 3, 4, 5, 5)), device=device)
    w = torch.randn(kwargs.pop("weight", (6, 3, 3, 3, 3)), device=device)
    b = torch.randn(kwargs.pop("bias")) if "bias" in kwargs else None
    with pytest.raises(ValueError, match=match):
        causal_conv3d(x, w, b, **kwargs)


def test_causal_conv3d_torch_compile_fullgraph(triton_backend, device):
    x = randn(1, 3, 4, 3, 5, device=device).to(memory_format=CL).requires_grad_()
    w = randn(5, 3, 3, 3, 3, device=device, scale=0.2).requires_grad_()
    b = randn(5, device=device).requires_grad_()
    fn = torch.compile(
        lambda x, w, b: causal_conv3d(x, w, b, stride=(2, 1, 1)).square().sum(),
        fullgraph=True,
        backend="aot_eager",
    )
    fn(x, w, b).backward()
    grads = [t.grad for t in (x, w, b)]
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = reference.causal_conv3d_ref(x64, w64, b64, (2, 1, 1)).square().sum()
    ref.backward()
    for g, r, name in zip(grads, (x64.grad, w64.grad, b64.grad), ("dx", "dweight", "dbias")):
        assert_close_to_fp64(g, g, r, name=name)


# Temporal VAE shapes (opensora-v1.2.md §3.3), bf16 on the GPU.
GPU_CASES = [
    (1, 128, 128, 17, 90, 160, 3, 1, "channels_last", False),
    (1, 256, 256, 17, 90, 160, 3, 2, "channels_last", True),
    (1, 512, 512, 5, 45, 80, 3, 1, "channels_last", False),
    (1, 256, 512, 5, 45, 80, 1, 1, "contiguous", False),
    (1, 4, 128, 17, 90, 160, 3, 1, "channels_last", False),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", GPU_CASES, ids=[f"{c[1]}to{c[2]}-T{c[3]}-{c[4]}x{c[5]}-k{c[6]}s{c[7]}" for c in GPU_CASES]
)
def test_causal_conv3d_bf16_real_shapes(triton_backend, case):
    _run(*case, dtype=torch.bfloat16, device="cuda")


def test_causal_conv3d_configs_pruned_by_layout():
    """FAST launches autotune over _GEMM_CONFIGS, generic strides run their single config: the sets
    the sm_90 gate compiles."""
    import triton

    module = importlib.import_module("opensora_fast.kernels.causal_conv3d")
    for strided in (module._STRIDED_CONFIG, module._DW_STRIDED_CONFIG):
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in module._GEMM_CONFIGS + (strided,)
        ]
        fast = [module._config_tuple(c) for c in module._prune(configs, {}, FAST=True)]
        generic = [module._config_tuple(c) for c in module._prune(configs, {}, FAST=False)]
        assert fast == list(module._GEMM_CONFIGS) and generic == [strided]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_strided_bias(layout, monkeypatch):
    """Issue 13: bias a stride-2 view: read through its stride (the old kernel read it as contiguous),
    its gradient back in the base's shape."""
    x_b, w_b, b_b = randn(1, 5, 4, 3, 4, seed=1), randn(6, 5, 3, 3, 3, seed=2, scale=0.1), randn(12, seed=3)
    dy = randn(1, 6, 4, 3, 4, seed=4)

    def run(backend, dt):
        monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
        leaves = [t.detach().to(dt).requires_grad_() for t in (x_b, w_b, b_b)]
        x = leaves[0].to(memory_format=CL) if layout == "channels_last" else leaves[0]
        y = causal_conv3d(x, leaves[1], leaves[2][::2])
        return (y, *torch.autograd.grad(y, leaves, dy.to(dt)))

    got, lowp, ref = run("triton", torch.float32), run("reference", torch.float32), run("reference", torch.float64)
    for name, g, lp, r in zip(("out", "dx", "dweight", "dbias_base"), got, lowp, ref):
        assert g.shape == r.shape, name
        assert_close_to_fp64(g, lp, r, name=name)


def test_generic_strides_config_follows_channel_counts():
    """Forward / dX on the generic path: 16-wide K or N blocks for channel counts <= 16 (the VAE's 4-channel
    convs: post_quant_conv 4->4 at 1x1x1 spilled 8 B at 255 registers with the 64 x 64 blocks, and a
    4-channel operand padded to 64 wasted 15/16 of the MMA); FAST launches keep _GEMM_CONFIGS."""
    import triton

    module = importlib.import_module("opensora_fast.kernels.causal_conv3d")
    table = module._GEMM_CONFIGS + tuple(module._STRIDED_CONFIGS.values())
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in table
    ]
    fwd, dx = module._gemm_prune("c_in", "c_out"), module._gemm_prune("c_out", "c_in")

    def pick(prune, c_in, c_out, fast=False):
        return [module._config_tuple(c) for c in prune(configs, {"c_in": c_in, "c_out": c_out}, FAST=fast)]

    assert pick(fwd, 128, 128, fast=True) == list(module._GEMM_CONFIGS)
    assert pick(fwd, 128, 256) == [(128, 64, 64, 4, 4)]
    assert pick(fwd, 4, 4) == [(128, 16, 16, 4, 4)]
    assert pick(fwd, 4, 512) == [(128, 64, 16, 4, 4)]  # conv1: K = 4 input channels
    assert pick(fwd, 128, 4) == [(128, 16, 64, 4, 4)]  # conv_out: N = 4 output channels
    assert pick(dx, 4, 512) == [(128, 16, 64, 4, 4)]  # dX of conv1: N = C_in = 4
    assert pick(dx, 128, 4) == [(128, 64, 16, 4, 4)]  # dX of conv_out: K = C_out = 4

"""Issue 13: one bad-input table over every public op, on both backends.

Each row feeds one op an input that is wrong or awkward: wrong rank, integer dtype, a meta tensor beside
CPU ones (device mismatch), non-contiguous / strided / expanded (stride 0) / permuted (channels-last)
layouts, zero-size dimensions, a NaN. The op must either raise a ValueError whose message names the
argument, or return the correct result: forward (and, with finite input, every gradient) against the
fp64 reference on the same values; NaN positions equal to the reference's (NaN in gives NaN out).
Wrong rank, dtype and device must raise. Rows run on the reference backend and on the Triton kernels
(the interpreter on CPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import torch
from opensora_fast.kernels import reference as R

from opensora_fast import kernels as K

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
B, N, C = 2, 5, 24
HEADS, D = 2, 16  # attention: C_attn = 32


@dataclass
class Op:
    name: str
    shapes: dict  # argument name -> shape (floating tensors, gradients checked)
    call: object  # (module with the public ops, tensors) -> output or tuple of outputs
    ref: object  # (tensors in fp64) -> same structure
    main: str  # the argument the rows mutate
    other: str  # the argument moved to the meta device
    empty: dict = field(default_factory=dict)  # argument name -> zero-size shape
    consts: object = None  # (dtype) -> dict of non-differentiable tensors (cos/sin)


def _rope(L, dim, dtype):
    cos, sin = R.rope_cos_sin(L, dim, dtype=dtype)
    return {"cos": cos.to(DEV), "sin": sin.to(DEV)}


SA_SHAPES = {"qkv": (B, 2 * 5, 3 * HEADS * D), "q_norm_weight": (D,), "k_norm_weight": (D,)}


def _self_attn(layout):
    def call(t):
        return K.self_attention(
            t["qkv"], t["q_norm_weight"], t["k_norm_weight"], num_heads=HEADS, num_frames=2, layout=layout
        )

    def ref(t):
        return R.self_attention_ref(
            t["qkv"], t["q_norm_weight"], t["k_norm_weight"], HEADS, 2, layout, 1e-6, None, D**-0.5
        )

    return call, ref


OPS = [
    Op(
        "layernorm_modulate",
        {"x": (B, N, C), "shift": (B, C), "scale": (B, C)},
        lambda t: K.layernorm_modulate(t["x"], t["shift"], t["scale"]),
        lambda t: R.layernorm_modulate_ref(t["x"], t["shift"], t["scale"], 1e-6),
        "x",
        "shift",
        {"x": (B, 0, C)},
    ),
    Op(
        "gated_residual",
        {"x": (B, N, C), "y": (B, N, C), "gate": (B, C)},
        lambda t: K.gated_residual(t["x"], t["y"], t["gate"]),
        lambda t: R.gated_residual_ref(t["x"], t["y"], t["gate"]),
        "x",
        "gate",
        {"x": (B, 0, C), "y": (B, 0, C)},
    ),
    Op(
        "add_layernorm_modulate",
        {"x": (B, N, C), "y": (B, N, C), "shift": (B, C), "scale": (B, C), "gate": (B, C)},
        lambda t: K.add_layernorm_modulate(t["x"], t["y"], t["shift"], t["scale"], gate=t["gate"]),
        lambda t: R.add_layernorm_modulate_ref(t["x"], t["y"], t["shift"], t["scale"], t["gate"], 1e-6),
        "y",
        "y",
        {"x": (B, 0, C), "y": (B, 0, C)},
    ),
    Op(
        "qk_norm_rope",
        {"q": (B, 6, 3, 8), "k": (B, 6, 3, 8), "q_weight": (8,), "k_weight": (8,)},
        lambda t: K.qk_norm_rope(t["q"], t["k"], t["q_weight"], t["k_weight"], cos=t["cos"], sin=t["sin"]),
        lambda t: R.qk_norm_rope_ref(t["q"], t["k"], t["q_weight"], t["k_weight"], 1e-6, t["cos"], t["sin"]),
        "q",
        "k",
        {"q": (0, 6, 3, 8), "k": (0, 6, 3, 8)},
        lambda dt: _rope(6, 8, dt),
    ),
    Op(
        "flash_attn_func",
        {"q": (B, 7, HEADS, D), "k": (B, 6, HEADS, D), "v": (B, 6, HEADS, D)},
        lambda t: K.flash_attn_func(t["q"], t["k"], t["v"], causal=True),
        lambda t: R.flash_attn_func_ref(t["q"], t["k"], t["v"], 0.0, D**-0.5, True),
        "q",
        "v",
        {"q": (B, 0, HEADS, D)},
    ),
    Op("self_attention spatial", SA_SHAPES, *_self_attn("spatial"), "qkv", "k_norm_weight", {"qkv": (B, 0, 96)}),
    Op("self_attention temporal", SA_SHAPES, *_self_attn("temporal"), "qkv", "q_norm_weight", {"qkv": (B, 0, 96)}),
    Op(
        "cross_attention",
        {"q": (B, N, HEADS * D), "kv": (7, 2 * HEADS * D)},
        lambda t: K.cross_attention(t["q"], t["kv"], [3, 4], num_heads=HEADS),
        lambda t: R.cross_attention_ref(t["q"], t["kv"], [3, 4], HEADS, D**-0.5),
        "q",
        "kv",
        {"q": (B, 0, HEADS * D)},
    ),
    Op(
        "causal_conv3d",
        {"x": (1, 3, 4, 5, 6), "weight": (4, 3, 3, 3, 3), "bias": (4,)},
        lambda t: K.causal_conv3d(t["x"], t["weight"], t["bias"]),
        lambda t: R.causal_conv3d_ref(t["x"], t["weight"], t["bias"]),
        "x",
        "weight",
        {"x": (0, 3, 4, 5, 6)},
    ),
    Op(
        "group_norm_silu",
        {"x": (2, 8, 3, 4, 5), "weight": (8,), "bias": (8,)},
        lambda t: K.group_norm_silu(t["x"], t["weight"], t["bias"], 4),
        lambda t: R.group_norm_silu_ref(t["x"], t["weight"], t["bias"], 4),
        "x",
        "bias",
        {"x": (2, 8, 0, 4, 5)},
    ),
]

# row kind -> must it raise? (None: a ValueError naming the argument or the correct result)
ROWS = {
    "rank": True,
    "dtype": True,
    "device": True,
    "transposed": None,  # last two dims swapped: no unit stride along the last dim
    "strided": None,  # every other element of dim 0
    "padded": None,  # rows padded: unit last stride, larger row stride (rows not 16-byte aligned)
    "expanded": None,  # dim 0 broadcast with stride 0
    "channels_last": None,  # channels-last for 4-D/5-D, dims 0 and 1 swapped in memory otherwise
    "empty": None,
    "nan": None,
}


def _leaf_and_view(kind, shape, dtype, gen):
    """(leaf shape, leaf -> argument view) for a row kind; views stay differentiable."""
    nd = len(shape)
    if kind == "transposed" and nd >= 2:
        return shape[:-2] + (shape[-1], shape[-2]), lambda t: t.transpose(-1, -2)
    if kind == "strided":
        return (2 * shape[0] + 1,) + shape[1:], lambda t: t[1::2]
    if kind == "padded":
        return shape[:-1] + (shape[-1] + 3,), lambda t: t[..., 1 : shape[-1] + 1]
    if kind == "expanded":
        return (1,) + shape[1:], lambda t: t.expand(shape)
    if kind == "channels_last":
        if nd == 5:
            return shape, lambda t: t.contiguous(memory_format=torch.channels_last_3d)
        if nd >= 2:
            perm = (1, 0) + tuple(range(2, nd))
            return tuple(shape[p] for p in perm), lambda t: t.permute(perm)
    return shape, lambda t: t


def _build(op: Op, kind: str, dtype, seed: int):
    """Leaves (fp32, requires grad where floating) and a function leaves -> argument dict."""
    gen = torch.Generator().manual_seed(seed)
    leaves, views = {}, {}
    for name, shape in op.shapes.items():
        view = lambda t: t  # noqa: E731
        if name == op.main:
            if kind == "empty":
                shape = op.empty[name]
            elif kind == "rank":
                shape = (1,) + tuple(shape)
            else:
                shape, view = _leaf_and_view(kind, tuple(shape), dtype, gen)
        elif kind == "empty" and name in op.empty:
            shape = op.empty[name]
        leaf = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if name.endswith("weight") and len(shape) == 1:
            leaf = 1.0 + 0.3 * leaf
        leaves[name] = leaf
        views[name] = view
    if kind == "nan":
        flat = leaves[op.main].view(-1)
        flat[flat.numel() // 3] = float("nan")

    def args(lv):
        out = {n: views[n](t) for n, t in lv.items()}
        if op.consts is not None:
            out.update(op.consts(next(iter(lv.values())).dtype))
        return out

    return leaves, args


def _structure(out):
    return out if isinstance(out, tuple) else (out,)


def _run(op: Op, kind: str):
    leaves64, args = _build(op, kind, torch.float32, seed=1234 + len(op.name) + len(kind))
    leaves = {}
    for name, t in leaves64.items():
        t = t.to(DEV)
        if kind == "dtype" and name == op.main:
            t = (t * 4).nan_to_num(0.0).to(torch.int32)
        elif kind == "device" and name == op.other:
            t = t.float().to("meta")
        else:
            t = t.float()
        if t.is_floating_point() and t.device.type != "meta":
            t.requires_grad_(True)
        leaves[name] = t
    try:
        out = _structure(op.call(args(leaves)))
    except ValueError as exc:
        return "raised", exc, None
    lv64 = {n: t.detach().double().cpu().requires_grad_(True) for n, t in leaves.items()}
    ref = _structure(op.ref(args(lv64)))
    return "ran", (out, ref, leaves, lv64), None


def _names(msg: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg) is not None


# rows the table found to be wrong on a backend: (op, kind, backend) -> reason (xfail, strict)
KNOWN = {}


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("op", OPS, ids=[o.name for o in OPS])
def test_bad_input(op: Op, kind: str, backend, request):
    reason = KNOWN.get((op.name, kind, backend))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    status, payload, _ = _run(op, kind)
    must_raise = ROWS[kind]
    bad = op.other if kind == "device" else op.main
    if status == "raised":
        msg = str(payload)
        assert _names(msg, bad) or (kind == "device" and _names(msg, op.main)), (
            f"{op.name} [{kind}]: ValueError does not name {bad!r}: {msg}"
        )
        return
    assert not must_raise, f"{op.name} [{kind}]: expected a ValueError naming {bad!r}, got a result"
    out, ref, leaves, lv64 = payload
    assert len(out) == len(ref)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.shape == r.shape, f"{op.name} [{kind}] output {i}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert o.dtype == torch.float32, f"{op.name} [{kind}] output {i}: dtype {o.dtype}"
        o64, r64 = o.detach().double().cpu(), r.detach()
        assert torch.equal(torch.isnan(o64), torch.isnan(r64)), (
            f"{op.name} [{kind}] output {i}: NaN at {int(torch.isnan(o64).sum())} positions, "
            f"reference at {int(torch.isnan(r64).sum())}"
        )
        fin = ~torch.isnan(r64)
        torch.testing.assert_close(o64[fin], r64[fin], rtol=1e-4, atol=1e-4, msg=lambda m: f"{op.name} [{kind}]: {m}")
    if kind == "nan":
        assert any(torch.isnan(o).any() for o in out), f"{op.name}: NaN in gave no NaN out"
        return
    if all(o.numel() == 0 for o in out):
        return
    # gradients of every floating argument against the fp64 reference, random upstream gradient
    gen = torch.Generator().manual_seed(99)
    gs = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref]
    names = [n for n, t in leaves.items() if t.requires_grad]
    got = torch.autograd.grad(
        [o for o in out], [leaves[n] for n in names], [g.float().to(DEV) for g in gs], allow_unused=True
    )
    want = torch.autograd.grad(list(ref), [lv64[n] for n in names], gs, allow_unused=True)
    for n, g, w in zip(names, got, want):
        w = torch.zeros_like(lv64[n]) if w is None else w
        assert g is not None, f"{op.name} [{kind}]: no gradient for {n}"
        assert not torch.isnan(g).any(), f"{op.name} [{kind}]: NaN in the gradient of {n}"
        torch.testing.assert_close(
            g.double().cpu(), w, rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{op.name} [{kind}] grad {n}: {m}"
        )

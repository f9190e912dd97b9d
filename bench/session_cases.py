"""The fixed, small case list of ``bench/gpu_session.sh`` (run by ``bench/session.py``), group by group.

Each group is a list of :class:`Spec`; the runner reads the list to plan (names only: building a Spec
allocates nothing and imports nothing heavy) and a worker process runs one group's specs in order.
Real shapes (a GPU, bf16) and dry shapes (CPU, fp32) go through the same code.

Groups (in run order):

- ``ceilings``: device-to-device copy GB/s (bytes read + written) and bf16 matmul TFLOP/s (8192^3,
  random data), measured in this run; every later ``pct_of_ceiling`` is against these two.
- ``correctness``: every public kernel forward + backward at real STDiT3-XL/2 / VAE shapes in bf16, inputs
  made and compared on the GPU: the kernel's error against the reference (``kernels/reference.py``)
  computed in fp32 on the GPU from the same bf16 inputs may be at most 2x the bf16 reference's own error
  plus atol 1.6e-2 x max(1, max|ref|) (tests/_close.py's rule), no NaN; each kernel is launched twice on
  the same inputs at a shape this process has not seen (the first call autotunes) and the second call's
  outputs and gradients must equal the first's bit for bit. Outputs NaN-poisoned (OPENSORA_FAST_POISON=1).
- ``attention_spatial``: self_attention spatial, 720p 2 s with CFG (2 x 15 frames of S = 3600, 16 x 72) vs the
  same prologue with SDPA forced onto the flash and the cuDNN backend; fwd and fwd+bwd.
- ``attention_temporal``: T' = 30 (480p 4 s, B = 2, S = 1590) and T' = 120 (720p 16 s, B = 1, S = 3600) vs
  Open-Sora 1.2's temporal path (reshape, RMSNorm, RoPE, then, as v1.2 does for N = T' <= B*S, the explicit
  (q*scale) @ k^T with an fp32 softmax: ``bench_attention._explicit``) and the same prologue on SDPA flash.
- ``add_layernorm_modulate``: 720p 2 s with CFG (108,000 rows x 1152) vs eager and one ``torch.compile`` of
  the eager function: fwd+bwd first (its first call holds the one compile), then its forward on the same
  graph (inputs require grad).
- ``causal_conv3d``: the temporal VAE decoder's convolutions at a 720p chunk (90x160: 512 channels x 5 frames,
  128 x 20) vs cuDNN (F.pad + F.conv3d) in the same layout: channels_last_3d, and contiguous NCDHW at the
  512-channel shape.
- ``stdit3``: one STDiT3-XL/2 denoising step, 720p 2 s (latent 4x15x90x160: 51 frames -> 15 latent frames),
  CFG batch 2, random weights, bf16, text-KV cache warm: our kernels vs OPENSORA_FAST_BACKEND=reference.
- ``vae_decode``: one 720p temporal chunk (latent 4x5x90x160 -> 17 frames of 720x1280), ours vs reference.

Dry mode: tiny shapes, fp32 on CPU; opensora_fast on the reference backend (``Ctx.interpret``: through the
Triton interpreter instead), ``torch.compile`` replaced by eager and SDPA backends by SDPA's math backend (each
record's ``note`` says so); the timings only prove the runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

H, D = 16, 72  # STDiT3-XL/2 heads and head_dim
C = H * D  # 1152


@dataclass
class Ctx:
    """What a worker knows while it runs a group."""

    dry: bool
    device: str
    dtype: torch.dtype
    ceilings: dict = field(default_factory=dict)  # {"gbps": .., "tflops": ..} from this run's ceilings group
    rep_ms: float = 100.0
    interpret: bool = False  # dry mode: run opensora_fast through the Triton interpreter (slow) instead of
    # the reference backend

    @property
    def ours_backend(self) -> str:
        """OPENSORA_FAST_BACKEND for the opensora_fast impl: Triton (on CPU: the interpreter, which the
        worker enables in dry mode), or the reference in a plain dry run."""
        return "reference" if self.dry and not self.interpret else "triton"


@dataclass
class Spec:
    group: str
    case: str  # what is measured, e.g. "fwd T'=30 S=3600"; with impl it names one result
    impl: str  # "opensora_fast" | "sdpa-flash" | "opensora-v1.2" | "torch.compile" | "reference" | ...
    shape: str
    dtype: str
    run: Callable[[Ctx], dict]  # measures and returns the result fields (ms, tflops, ok, ...)
    note: str = ""
    est_case: str | None = None  # the case of kernels/_sm90_cases.py whose static estimate this measures

    @property
    def key(self) -> str:
        return f"{self.group}/{self.case}/{self.impl}"


# ---------------------------------------------------------------------------------------------
# measuring


def sync(ctx: Ctx) -> None:
    if ctx.device == "cuda":
        torch.cuda.synchronize()


def settle(ctx: Ctx) -> None:
    """Free the previous case's memory and restart the peak counter (GPU only: nothing to free in dry mode)."""
    if ctx.device == "cuda":
        import gc

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def steady_ms(fn: Callable[[], object], ctx: Ctx) -> float:
    """Median ms per call after the first: CUDA events through triton.testing.do_bench (small rep budget)
    on a GPU; one wall-clock call on CPU (not a performance figure). A dry run skips it (ms = first call)."""
    if ctx.device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=ctx.rep_ms, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def timed(make: Callable[[], Callable[[], object]], *, flops=None, nbytes=None, bound=None) -> Callable[[Ctx], dict]:
    """A Spec.run that builds the callable (``setup_ms``), times its first call with a sync
    (``first_call_ms``: compile + autotune), then the steady state (``ms``). ``flops`` / ``nbytes``
    may be ints or zero-argument callables (evaluated after the timing). ``pct_of_ceiling`` is against the
    matmul ceiling when ``bound`` is "flops" (the default when flops are given), else the copy ceiling."""

    def run(ctx: Ctx) -> dict:
        settle(ctx)
        t0 = time.perf_counter()
        fn = make()
        sync(ctx)
        setup = (time.perf_counter() - t0) * 1e3
        if ctx.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        sync(ctx)
        first = (time.perf_counter() - t0) * 1e3
        ms = first if ctx.dry else steady_ms(fn, ctx)  # dry: one call proves the plumbing
        rec = {"ms": ms, "first_call_ms": first, "setup_ms": setup, "ok": True}
        if ctx.device == "cuda":
            rec["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        fl = flops() if callable(flops) else flops
        nb = nbytes() if callable(nbytes) else nbytes
        by_flops = (bound or ("flops" if fl else "bytes")) == "flops"
        if fl:
            rec["tflops"] = fl / ms / 1e9
            if by_flops and ctx.ceilings.get("tflops"):
                rec["pct_of_ceiling"] = 100 * rec["tflops"] / ctx.ceilings["tflops"]
        if nb:
            rec["gbps"] = nb / ms / 1e6
            if not by_flops and ctx.ceilings.get("gbps"):
                rec["pct_of_ceiling"] = 100 * rec["gbps"] / ctx.ceilings["gbps"]
        del fn
        settle(ctx)
        return rec

    return run


def lazy_fwd_bwd(call: Callable[[], object], leaves: list[torch.Tensor]) -> Callable[[], None]:
    """fn() running call() forward and backward with a fixed random upstream gradient made on the first
    call (so the first call holds the forward's compile too); leaf grads reset each call."""
    grads: list[torch.Tensor] = []

    def fn():
        for t in leaves:
            t.grad = None
        out = call()
        outs = out if isinstance(out, tuple) else (out,)
        if not grads:
            g = torch.Generator(device=outs[0].device).manual_seed(7)
            grads.extend(torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype) for o in outs)
        torch.autograd.backward(outs, grads)

    return fn


def _randn(shape, ctx: Ctx, seed: int, scale: float = 1.0, dtype=None) -> torch.Tensor:
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    t = torch.randn(shape, generator=g, device=ctx.device, dtype=torch.float32) * scale
    return t.to(dtype or ctx.dtype)


def _dt(ctx_dry: bool) -> str:
    return "fp32" if ctx_dry else "bf16"


# ---------------------------------------------------------------------------------------------
# ceilings


def _ceilings(dry: bool) -> list[Spec]:
    n = (1 << 20) if dry else (1 << 30)  # elements per buffer: 2 GiB of bf16 on the GPU
    m = 256 if dry else 8192

    def copy(ctx: Ctx) -> dict:
        a = _randn((n,), ctx, 1)
        b = torch.empty_like(a)
        rec = timed(lambda: lambda: b.copy_(a), nbytes=2 * a.numel() * a.element_size())(ctx)
        rec["pct_of_ceiling"] = 100.0
        return rec

    def matmul(ctx: Ctx) -> dict:
        x, y = _randn((m, m), ctx, 2), _randn((m, m), ctx, 3)
        rec = timed(lambda: lambda: x @ y, flops=2 * m**3)(ctx)
        rec["pct_of_ceiling"] = 100.0
        return rec

    dt = _dt(dry)
    return [
        Spec("ceilings", "copy d2d", "torch", f"2 x {n} elements", dt, copy),
        Spec("ceilings", f"matmul {m}^3", "torch", f"{m}x{m} @ {m}x{m}", dt, matmul),
    ]


# ---------------------------------------------------------------------------------------------
# correctness


@dataclass
class Check:
    name: str
    shape: str
    make: Callable[[Ctx], tuple[Callable, Callable, list[torch.Tensor]]]  # -> kernel, reference, inputs


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.to(ref.dtype) - ref).abs().max().item()


def _fwd_bwd_once(fn, inputs, grads_out, dtype):
    """Outputs and input gradients of fn at ``dtype``; grads_out: one upstream gradient per output
    (made from the first output set when None)."""
    leaves = [t.detach().to(dtype).requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    if grads_out is None:
        g = torch.Generator(device=outs[0].device).manual_seed(11)
        grads_out = [torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float32) for o in outs]
    want = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(outs, want, [g.to(o.dtype) for g, o in zip(grads_out, outs)], allow_unused=True)
    return [o.detach() for o in outs], list(grads), grads_out


def run_check(check: Check, ctx: Ctx) -> dict:
    """The correctness rule of the module docstring for one kernel; returns the result fields."""
    from bench.harness import backend_env

    # the fp32 truth must be fp32: no TF32 in matmuls or cuDNN convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    truth_dtype = torch.float64 if ctx.dtype == torch.float32 else torch.float32
    atol = 1e-5 if ctx.dtype == torch.float32 else 1.6e-2
    settle(ctx)
    kernel, ref, inputs = check.make(ctx)
    with backend_env(ctx.ours_backend):
        t0 = time.perf_counter()
        outs1, grads1, gout = _fwd_bwd_once(kernel, inputs, None, ctx.dtype)
        sync(ctx)
        first = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        outs2, grads2, _ = _fwd_bwd_once(kernel, inputs, gout, ctx.dtype)
        sync(ctx)
        second = (time.perf_counter() - t0) * 1e3
    with backend_env("reference"):
        outs_lp, grads_lp, _ = _fwd_bwd_once(ref, inputs, gout, ctx.dtype)
        outs_t, grads_t, _ = _fwd_bwd_once(ref, inputs, gout, truth_dtype)
    nan = any(torch.isnan(o).any().item() for o in outs1) or any(
        g is None or torch.isnan(g).any().item() for g, r in zip(grads1, grads_t) if r is not None
    )
    same = all(torch.equal(a, b) for a, b in zip(outs1, outs2)) and all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(grads1, grads2)
    )
    fe = max(_max_err(o, r) for o, r in zip(outs1, outs_t))
    fb = max(_max_err(o, r) for o, r in zip(outs_lp, outs_t))
    pairs = [(g, lp, r) for g, lp, r in zip(grads1, grads_lp, grads_t) if r is not None]
    be = max((_max_err(g, r) if g is not None else float("inf")) for g, _, r in pairs)  # missing: fails
    bb = max(_max_err(lp, r) for _, lp, r in pairs)
    scale_f = max(r.abs().max().item() for r in outs_t)
    scale_b = max(r.abs().max().item() for _, _, r in pairs)
    fwd_ok = fe <= 2 * fb + atol * max(1.0, scale_f)
    bwd_ok = be <= 2 * bb + atol * max(1.0, scale_b)
    ok = (not nan) and same and fwd_ok and bwd_ok
    why = [w for w, bad in (("NaN", nan), ("second call differs", not same), ("fwd error", not fwd_ok),
                            ("bwd error", not bwd_ok)) if bad]  # fmt: skip
    del outs1, outs2, grads1, grads2, outs_lp, grads_lp, outs_t, grads_t, inputs
    settle(ctx)
    return {
        "ok": ok, "error": "; ".join(why) or None, "first_call_ms": first, "ms": None,
        "detail": {"fwd_err": fe, "fwd_ref_err": fb, "bwd_err": be, "bwd_ref_err": bb, "max_ref": scale_f,
                   "repeat_equal": same, "second_call_ms": second, "truth": str(truth_dtype).removeprefix("torch.")},
    }  # fmt: skip


def _kernels():
    """(opensora_fast.kernels, its reference module), imported in the worker only."""
    from opensora_fast import kernels

    return kernels, kernels.reference


def _checks(dry: bool) -> list[Check]:
    # (B, T, S, C, heads, D): STDiT3-XL/2 on the GPU, small under the interpreter
    Hh, Dd = (2, 24) if dry else (H, D)
    Cc = Hh * Dd
    seed = iter(range(100, 10_000))

    def inp(ctx, *shape, scale=1.0):
        return _randn(shape, ctx, next(seed), scale)

    def mods(ctx, B, n):
        return [inp(ctx, B, 1, Cc, scale=0.5) for _ in range(n)]

    checks = []
    # adaLN family: row counts differ per case (fresh autotune keys)
    B, T, S = (2, 3, 5) if dry else (2, 4, 3600)
    n_gr, n_aln = (13, 11) if dry else (10_001, 7_203)

    def lnm(ctx):
        K, R = _kernels()
        mask = (torch.arange(T, device=ctx.device) % 2 == 0).expand(B, T)
        kern = lambda x, a, b, a0, b0: K.layernorm_modulate(x, a, b, x_mask=mask, shift0=a0, scale0=b0)  # noqa: E731
        ref = lambda x, a, b, a0, b0: R.layernorm_modulate_ref(x, a, b, 1e-6, mask, a0, b0)  # noqa: E731
        return kern, ref, [inp(ctx, B, T * S, Cc), *mods(ctx, B, 4)]

    def gres(ctx):
        K, R = _kernels()
        return K.gated_residual, R.gated_residual_ref, [inp(ctx, B, n_gr, Cc), inp(ctx, B, n_gr, Cc), *mods(ctx, B, 1)]

    def aln(ctx):
        K, R = _kernels()
        kern = lambda x, y, a, b, g: K.add_layernorm_modulate(x, y, a, b, gate=g)  # noqa: E731
        ref = lambda x, y, a, b, g: R.add_layernorm_modulate_ref(x, y, a, b, g)  # noqa: E731
        return kern, ref, [inp(ctx, B, n_aln, Cc), inp(ctx, B, n_aln, Cc), *mods(ctx, B, 3)]

    nq, Tq = (7, 5) if dry else (900, 30)

    def qkn(ctx):
        K, R = _kernels()
        cos, sin = R.rope_cos_sin(Tq, Dd, device=ctx.device)
        cos, sin = cos.to(ctx.dtype), sin.to(ctx.dtype)
        kern = lambda q, k, a, b: K.qk_norm_rope(q, k, a, b, cos=cos, sin=sin)  # noqa: E731
        ref = lambda q, k, a, b: R.qk_norm_rope_ref(q, k, a, b, 1e-6, cos.to(q.dtype), sin.to(q.dtype))  # noqa: E731
        w = [1 + 0.1 * inp(ctx, Dd) for _ in range(2)]
        return kern, ref, [inp(ctx, nq, Tq, Hh, Dd), inp(ctx, nq, Tq, Hh, Dd), *w]

    checks += [
        Check("layernorm_modulate (x_mask)", f"x ({B},{T * S},{Cc}) T={T}", lnm),
        Check("gated_residual", f"x ({B},{n_gr},{Cc})", gres),
        Check("add_layernorm_modulate", f"x ({B},{n_aln},{Cc})", aln),
        Check("qk_norm_rope", f"q ({nq},{Tq},{Hh},{Dd})", qkn),
    ]

    Lq, Lk = (9, 7) if dry else (1590, 1200)

    def flash(ctx):
        K, R = _kernels()
        kern = lambda q, k, v: K.flash_attn_func(q, k, v, causal=True)  # noqa: E731
        ref = lambda q, k, v: R.flash_attn_func_ref(q, k, v, causal=True)  # noqa: E731
        return kern, ref, [inp(ctx, 2, n, Hh, Dd) for n in (Lq, Lk, Lk)]

    def self_attn(layout, Bs, Ts, Ss, Hs, Ds):
        def make(ctx):
            K, R = _kernels()
            rope = None
            if layout == "temporal":
                cos, sin = R.rope_cos_sin(Ts, Ds, device=ctx.device)
                rope = (cos.to(ctx.dtype), sin.to(ctx.dtype))
            kern = lambda qkv, a, b: K.self_attention(  # noqa: E731
                qkv, a, b, num_heads=Hs, num_frames=Ts, layout=layout, rope=rope
            )

            def ref(qkv, a, b):
                r = None if rope is None else (rope[0].to(qkv.dtype), rope[1].to(qkv.dtype))
                return R.self_attention_ref(qkv, a, b, Hs, Ts, layout, rope=r)

            w = [1 + 0.1 * inp(ctx, Ds) for _ in range(2)]
            return kern, ref, [inp(ctx, Bs, Ts * Ss, 3 * Hs * Ds), *w]

        return make

    sp = (2, 2, 5, Hh, Dd) if dry else (2, 2, 3600, H, D)
    tp = (1, 5, 4, Hh, Dd) if dry else (1, 30, 450, H, D)
    tl = (1, 67, 2, 2, 72) if dry else (1, 120, 120, H, D)
    lens = [5, 0] if dry else [300, 173]
    Nc = 6 if dry else 7200

    def cross(ctx):
        K, R = _kernels()
        kern = lambda q, kv: K.cross_attention(q, kv, lens, num_heads=Hh)  # noqa: E731
        ref = lambda q, kv: R.cross_attention_ref(q, kv, lens, Hh)  # noqa: E731
        return kern, ref, [inp(ctx, 2, Nc, Cc), inp(ctx, sum(lens), 2 * Cc)]

    def qkv_shape(b, t, s, h, d):
        return f"qkv ({b},{t * s},{3 * h * d}) T={t} H={h} D={d}"

    checks += [
        Check("flash_attn_func causal", f"q ({2},{Lq},{Hh},{Dd}) k ({2},{Lk})", flash),
        Check("self_attention spatial", qkv_shape(*sp), self_attn("spatial", *sp)),
        Check(f"self_attention temporal T'={tp[1]} packed", qkv_shape(*tp), self_attn("temporal", *tp)),
        Check(f"self_attention temporal T'={tl[1]} long", qkv_shape(*tl), self_attn("temporal", *tl)),
        Check("cross_attention varlen", f"q (2,{Nc},{Cc}) lens {'/'.join(map(str, lens))}", cross),
    ]

    def conv(Ci, Co, Tv, Hv, Wv, k, st, channels_last):
        def make(ctx):
            K, R = _kernels()
            x = inp(ctx, 1, Ci, Tv, Hv, Wv)
            if channels_last:
                x = x.to(memory_format=torch.channels_last_3d)
            w = inp(ctx, Co, Ci, k, k, k, scale=(Ci * k**3) ** -0.5)
            kern = lambda x, w, b: K.causal_conv3d(x, w, b, stride=(st, 1, 1))  # noqa: E731
            ref = lambda x, w, b: R.causal_conv3d_ref(x, w, b, stride=(st, 1, 1))  # noqa: E731
            return kern, ref, [x, w, inp(ctx, Co)]

        return make

    def gn(Bg, Cg, Tv, Hv, Wv, G, channels_last):
        def make(ctx):
            K, R = _kernels()
            x = inp(ctx, Bg, Cg, Tv, Hv, Wv)
            if channels_last:
                x = x.to(memory_format=torch.channels_last_3d)
            kern = lambda x, w, b: K.group_norm_silu(x, w, b, G)  # noqa: E731
            ref = lambda x, w, b: R.group_norm_silu_ref(x, w, b, G)  # noqa: E731
            return kern, ref, [x, 1 + 0.1 * inp(ctx, Cg), inp(ctx, Cg)]

        return make

    cv1 = (5, 4, 5, 5, 6, 3, 1) if dry else (128, 128, 9, 45, 80, 3, 1)
    cv2 = (4, 6, 4, 3, 5, 3, 2) if dry else (128, 256, 9, 32, 48, 3, 2)
    gn1 = (1, 6, 3, 4, 5, 2) if dry else (1, 256, 9, 45, 80, 32)
    gn2 = (2, 8, 2, 3, 3, 4) if dry else (2, 128, 5, 36, 64, 32)

    def cshape(Ci, Co, Tv, Hv, Wv, k, st):
        return f"x (1,{Ci},{Tv},{Hv},{Wv}) -> {Co} k={k} st={st}"

    checks += [
        Check("causal_conv3d NCDHW", cshape(*cv1), conv(*cv1, False)),
        Check("causal_conv3d NDHWC t-stride 2", cshape(*cv2), conv(*cv2, True)),
        Check("group_norm_silu NCDHW", f"x {gn1[:5]} G={gn1[5]}", gn(*gn1, False)),
        Check("group_norm_silu NDHWC", f"x {gn2[:5]} G={gn2[5]}", gn(*gn2, True)),
    ]
    return checks


def _correctness(dry: bool) -> list[Spec]:
    return [
        Spec("correctness", c.name, "opensora_fast", c.shape, _dt(dry), lambda ctx, c=c: run_check(c, ctx))
        for c in _checks(dry)
    ]


# ---------------------------------------------------------------------------------------------
# attention


def _sdpa_ctx(impl: str, ctx: Ctx):
    """SDPA forced onto impl's backend on the GPU; the math backend in dry mode (CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if ctx.dry:
        return sdpa_kernel(SDPBackend.MATH)
    return sdpa_kernel({"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[impl])


def _self_attn_spec(group, impl, mode, B, T, S, heads, hd, dry, est=None) -> Spec:
    """self_attention on qkv (B, T*S, 3C) against a baseline. flops: 4 * sequences * H * L^2 * D forward,
    3.5x that for fwd+bwd (the backward recomputes QK^T: 5 matmuls); bytes: qkv read + o written forward
    (4C per token), 11C per token fwd+bwd (as kernels/_sm90_cases.py counts them)."""
    layout = "spatial" if group == "attention_spatial" else "temporal"
    rope = layout == "temporal"
    L, nseq = (S, B * T) if layout == "spatial" else (T, B * S)
    elem = 4 if dry else 2
    io = B * T * S * heads * hd * elem
    flops = int((1.0 if mode == "fwd" else 3.5) * 4 * nseq * heads * L * L * hd)
    nbytes = (4 if mode == "fwd" else 11) * io

    def run(ctx: Ctx) -> dict:
        from opensora_fast.kernels import reference, self_attention

        from bench import bench_attention as ba
        from bench.harness import with_backend

        def make():
            qkv = _randn((B, T * S, 3 * heads * hd), ctx, 21)
            qw, kw = (1 + 0.1 * _randn((hd,), ctx, s) for s in (22, 23))
            cos, sin = reference.rope_cos_sin(T if rope else S, hd, device=ctx.device)
            if impl == "opensora_fast":
                fn = with_backend(
                    lambda qkv, qw, kw, cos, sin: self_attention(
                        qkv, qw, kw, num_heads=heads, num_frames=T, layout=layout, rope=(cos, sin) if rope else None
                    ),
                    ctx.ours_backend,
                )
            elif impl.startswith("sdpa-"):
                plain = ba._eager_self(ba._core("eager", "spatial"), heads, T, layout, rope)

                def fn(*a):
                    with _sdpa_ctx(impl, ctx):
                        return plain(*a)
            else:  # Open-Sora 1.2's temporal path: explicit attention, fp32 softmax
                fn = ba._eager_self(ba._explicit, heads, T, layout, rope)
            call = lambda: fn(qkv, qw, kw, cos, sin)  # noqa: E731
            if mode == "fwd":
                return call
            for t in (qkv, qw, kw):
                t.requires_grad_()
            return lazy_fwd_bwd(call, [qkv, qw, kw])

        # temporal attention is memory-bound (short sequences): judged against the copy ceiling
        return timed(make, flops=flops, nbytes=nbytes, bound="bytes" if rope else "flops")(ctx)

    note = "dry: SDPA math backend" if dry and impl.startswith("sdpa-") else ""
    case = f"{mode} B={B} T'={T} S={S}"
    shape = f"qkv ({B},{T * S},{3 * heads * hd}) H={heads} D={hd}"
    return Spec(group, case, impl, shape, _dt(dry), run, note, est if impl == "opensora_fast" else None)


def _attention_spatial(dry: bool) -> list[Spec]:
    # 720p 2 s with CFG: 2 x 15 frames of 3600 tokens
    B, T, S, heads, hd = (1, 2, 5, 2, 16) if dry else (2, 15, 3600, H, D)
    return [
        _self_attn_spec("attention_spatial", impl, mode, B, T, S, heads, hd, dry, f"spatial attention {mode} 720p-2s")
        for mode in ("fwd", "fwd+bwd")
        for impl in ("opensora_fast", "sdpa-flash", "sdpa-cudnn")
    ]


def _attention_temporal(dry: bool) -> list[Spec]:
    # T' = 30: 480p 4 s with CFG (2 x 1590 positions); T' = 120: 720p 16 s, one sample (3600 positions)
    shapes = [(1, 3, 4, "-"), (1, 7, 4, "-")] if dry else [(2, 30, 1590, "480p-4s"), (1, 120, 3600, "720p-16s")]
    heads, hd = (2, 16) if dry else (H, D)
    return [
        _self_attn_spec(
            "attention_temporal", impl, mode, B, T, S, heads, hd, dry, f"temporal attention {mode} T'={T} {tag}"
        )  # fmt: skip
        for B, T, S, tag in shapes
        for mode in ("fwd", "fwd+bwd")
        for impl in ("opensora_fast", "opensora-v1.2", "sdpa-flash")
    ]


# ---------------------------------------------------------------------------------------------
# add_layernorm_modulate


_COMPILED: dict = {}


def _add_ln(dry: bool) -> list[Spec]:
    B, N, Cc = (2, 8, 64) if dry else (2, 15 * 3600, C)  # 720p 2 s with CFG: 108,000 rows
    elem = 4 if dry else 2
    specs = []
    units_of = {"fwd": 4, "fwd+bwd": 10}  # activations moved, in units of B*N*C elements
    order = [(m, i) for i in ("opensora_fast", "eager") for m in units_of]
    # last, so a compile past the deadline loses only these; fwd+bwd first: its one compile (the joint
    # training graph) also serves the fwd case, whose inputs therefore require grad too
    order += [("fwd+bwd", "torch.compile"), ("fwd", "torch.compile")]
    for mode, impl in order:
        units = units_of[mode]

        def run(ctx: Ctx, impl=impl, mode=mode, units=units) -> dict:
            from opensora_fast.kernels import add_layernorm_modulate

            from bench import bench_layernorm_modulate as bl
            from bench.harness import with_backend

            op = "add_layernorm_modulate"
            if impl == "torch.compile" and not ctx.dry:
                if op not in _COMPILED:  # one compiled object for both modes
                    _COMPILED[op] = torch.compile(bl._ref_fn(op), dynamic=False)
                fn = _COMPILED[op]
            elif impl == "opensora_fast":
                fn = with_backend(lambda x, y, a, b, g: add_layernorm_modulate(x, y, a, b, gate=g), ctx.ours_backend)
            else:
                fn = bl._ref_fn(op)

            def make():
                x, y = _randn((B, N, Cc), ctx, 31), _randn((B, N, Cc), ctx, 32)
                m = [_randn((B, 1, Cc), ctx, s, 0.5) for s in (33, 34, 35)]
                call = lambda: fn(x, y, *m)  # noqa: E731
                if mode == "fwd" and impl != "torch.compile":
                    return call
                for t in (x, y, *m):
                    t.requires_grad_()
                return call if mode == "fwd" else lazy_fwd_bwd(call, [x, y, *m])

            return timed(make, nbytes=units * B * N * Cc * elem)(ctx)

        note = "training-graph forward (inputs require grad)" if impl == "torch.compile" and mode == "fwd" else ""
        if dry and impl == "torch.compile":
            note = "; ".join(filter(None, [note, "dry: eager stand-in for torch.compile"]))
        est = f"add_layernorm_modulate {mode} 720p-2s" if impl == "opensora_fast" else None
        specs.append(Spec("add_layernorm_modulate", f"{mode} rows={B * N}", impl, f"x ({B},{N},{Cc}) gate",
                          _dt(dry), run, note, est))  # fmt: skip
    return specs


# ---------------------------------------------------------------------------------------------
# causal_conv3d


def _conv(dry: bool) -> list[Spec]:
    # (B, C_in, C_out, T, H, W, k): the temporal VAE decoder at a 720p chunk (mid/block 3 at 5 latent
    # frames x 512 channels; the last block at 20 frames x 128 channels)
    big = (1, 4, 8, 3, 4, 5, 3) if dry else (1, 512, 512, 5, 90, 160, 3)
    small = (1, 4, 4, 4, 3, 3, 3) if dry else (1, 128, 128, 20, 90, 160, 3)
    elem = 4 if dry else 2
    # both layouts at the big shape (the temporal VAE feeds channels_last_3d or contiguous activations
    # depending on its version), channels-last elsewhere
    plan = [
        (big, "fwd", "opensora_fast", True), (big, "fwd", "cudnn", True),
        (big, "fwd", "opensora_fast", False), (big, "fwd", "cudnn", False),
        (big, "fwd+bwd", "opensora_fast", True), (big, "fwd+bwd", "cudnn", True),
        (small, "fwd", "opensora_fast", True), (small, "fwd", "cudnn", True),
    ]  # fmt: skip
    specs = []
    for shape, mode, impl, cl in plan:
        Bc, Ci, Co, T, Hh, Ww, k = shape
        M, K = Bc * T * Hh * Ww, Ci * k**3
        flops = 2 * M * Co * K * (3 if mode == "fwd+bwd" else 1)
        fwd_bytes = (Bc * Ci * T * Hh * Ww + Co * K + Co + M * Co) * elem
        nbytes = fwd_bytes + ((M * Co + 2 * Bc * Ci * T * Hh * Ww + 2 * Co * K) * elem if mode == "fwd+bwd" else 0)

        def run(ctx: Ctx, shape=shape, mode=mode, impl=impl, cl=cl, flops=flops, nbytes=nbytes) -> dict:
            from opensora_fast.kernels import causal_conv3d

            from bench.bench_causal_conv3d import _cudnn
            from bench.harness import with_backend

            Bc, Ci, Co, T, Hh, Ww, k = shape
            if impl == "opensora_fast":
                fn = with_backend(lambda x, w, b: causal_conv3d(x, w, b, stride=(1, 1, 1)), ctx.ours_backend)
            else:
                fn = lambda x, w, b: _cudnn(x, w, b, (1, 1, 1))  # noqa: E731

            def make():
                x = _randn((Bc, Ci, T, Hh, Ww), ctx, 41)
                if cl:
                    x = x.to(memory_format=torch.channels_last_3d)
                w = _randn((Co, Ci, k, k, k), ctx, 42, (Ci * k**3) ** -0.5)
                b = _randn((Co,), ctx, 43)
                call = lambda: fn(x, w, b)  # noqa: E731
                if mode == "fwd":
                    return call
                for t in (x, w, b):
                    t.requires_grad_()
                return lazy_fwd_bwd(call, [x, w, b])

            return timed(make, flops=flops, nbytes=nbytes)(ctx)

        layout = "NDHWC" if cl else "NCDHW"
        note = "dry: F.conv3d on CPU" if dry and impl == "cudnn" else ""
        case = f"{mode} C={Ci}->{Co} T={T} {Hh}x{Ww} k={k}"
        est = "causal_conv3d fwd 512->512 720p chunk" if (shape, mode, impl, cl) == plan[0] else None
        specs.append(Spec("causal_conv3d", case, f"{impl} {layout}", f"x ({Bc},{Ci},{T},{Hh},{Ww})", _dt(dry), run,
                          note, est))  # fmt: skip
    return specs


# ---------------------------------------------------------------------------------------------
# models


def _stdit3(dry: bool) -> list[Spec]:
    specs = []
    for impl in ("opensora_fast", "reference"):

        def run(ctx: Ctx, impl=impl) -> dict:
            from bench import bench_stdit3 as bs
            from opensora_fast.models.stdit3 import STDiT3Config

            if ctx.dry:
                cfg, res, length, lens = STDiT3Config.tiny(), bs.TINY_RES["tiny"], bs.TINY_LENGTHS["2f"], (5, 8)
            else:
                cfg, res, length, lens = STDiT3Config.xl_2(), bs.RESOLUTIONS["720p"], bs.LENGTHS["2s"], bs.TEXT_LENS
            flops = bs.step_flops(cfg, 2, length[0], res[0], res[1], lens, velocity_only=True, text_cached=True)
            name = "reference" if ctx.ours_backend == "reference" else impl
            make = bs._step_maker(cfg, name, res, length, lens, ctx.device, ctx.dtype)
            return timed(make, flops=flops)(ctx)

        shape = "B=2 4x3x2x3 (tiny config)" if dry else "B=2 4x15x90x160 text=120/300"
        specs.append(Spec("stdit3", "denoising step 720p 2s" if not dry else "denoising step tiny", impl, shape,
                          _dt(dry), run))  # fmt: skip
    return specs


def _vae(dry: bool) -> list[Spec]:
    specs = []
    for impl in ("opensora_fast", "reference"):

        def run(ctx: Ctx, impl=impl) -> dict:
            import dataclasses

            from bench import bench_vae as bv
            from opensora_fast.models.vae import OpenSoraVAEConfig

            if ctx.dry:
                cfg = dataclasses.replace(OpenSoraVAEConfig.tiny(filters=4), micro_frame_size=bv.TINY_CHUNK)
                shape = (2, 4, 4, bv.TINY_CHUNK, None)
            else:
                cfg, shape = OpenSoraVAEConfig.v1_2(), (5, 90, 160, 17, None)
            t, h, w, frames, _ = shape
            name = "reference" if ctx.ours_backend == "reference" else impl
            make = bv._maker(cfg, name, shape, ctx.device, ctx.dtype)
            # flops: FlopCounterMode over the decode on the meta device (seconds; left out of a dry run)
            flops = None if ctx.dry else (lambda: bv.decode_flops(cfg, t, h, w, frames))
            return timed(make, flops=flops)(ctx)

        shape = "z 4x2x4x4 -> 5 frames (tiny config)" if dry else "z (1,4,5,90,160) -> 17x720x1280"
        est = "VAE decode 720p 17 frames" if impl == "opensora_fast" else None
        specs.append(Spec("vae_decode", "decode one chunk" + ("" if dry else " 720p"), impl, shape, _dt(dry), run,
                          est_case=est))  # fmt: skip
    return specs


GROUPS: dict[str, Callable[[bool], list[Spec]]] = {
    "ceilings": _ceilings,
    "correctness": _correctness,
    "attention_spatial": _attention_spatial,
    "attention_temporal": _attention_temporal,
    "add_layernorm_modulate": _add_ln,
    "causal_conv3d": _conv,
    "stdit3": _stdit3,
    "vae_decode": _vae,
}


def plan(dry: bool, groups=None, interpret: bool = False) -> dict[str, list[Spec]]:
    """{group: specs} in run order (cheap: nothing is allocated or compiled). A dry plan without
    ``interpret`` runs opensora_fast on the reference backend, and its notes say so."""
    out = {g: GROUPS[g](dry) for g in (groups or GROUPS)}
    if dry and not interpret:
        for s in (s for specs in out.values() for s in specs if s.impl.startswith("opensora_fast")):
            s.note = "; ".join(filter(None, [s.note, "dry: reference backend"]))
    return out

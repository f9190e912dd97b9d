"""Hopper (sm_90) gate, without a GPU: compile what runs, read its machine code, estimate its time.

1. **Compile what runs.** The cases of ``_sm90_cases`` make real calls (public ops, STDiT3-XL/2 blocks, the
   1.2 VAE) at real shapes on ``meta`` tensors inside ``_record.recording()``; every launch they make, with
   every config the autotuner would try, is specialised by Triton's own binder (pointer dtypes from the
   tensors, 16-byte divisibility from the values) and compiled exactly so for ``GPUTarget("cuda", 90, 32)``.
2. **Read the SASS** (``cuobjdump`` shipped in Triton) and fail on: a compile error; local memory
   (``LDL``/``STL``) or a stack frame (spills); shared memory over 227 KiB; a ``tl.dot`` kernel without
   HGMMA, or whose HGMMA work is mostly narrower than N=64; 16-bit-or-narrower global accesses making up
   the bulk of a kernel's global traffic instructions (tiles not vectorised to 16 bytes); a loop that
   runs HGMMA on tiles fetched with plain ``LDG`` instead of async copies (``LDGSTS`` / TMA).
3. **Estimate** (never a measurement): per launch, instructions by unit from the SASS (hot loops times their
   trip counts at the real shape) over Hopper's per-SM rates, at the occupancy registers and shared memory
   allow, in whole waves over 132 SMs; never below the launch's own bytes over the copy ceiling. A case's
   estimate is the sum over its launch sites of the best config's estimate (what the autotuner would keep).
   ``--perf`` prints the table against each case's floor; ``--check-ratchet`` fails when a case got more
   than 10% slower than ``sm90_estimates.json`` (``--write-ratchet`` rewrites it).

Run with ``TRITON_INTERPRET`` unset: ``python -m opensora_fast.kernels._sm90 [--perf] [--json F]``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

from opensora_fast.kernels._record import TensorArg

SM90_MAX_SHARED = 232448  # per block (227 KiB)
SM90_SHARED_PER_SM = 233472  # 228 KiB
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64

# H200 (sm_90, 132 SMs). Ceilings for floors: the device notes' measured leads (re-measured by
# bench/gpu_session.sh); the estimate uses Hopper's per-SM issue rates at the clock that gives the
# dense bf16 peak (989 TFLOP/s = 132 SMs x 4096 FLOP/clk x 1.83 GHz).
SMS = 132
CLOCK_HZ = 1.83e9
MATMUL_CEILING = 790e12  # bf16 FLOP/s, random data
COPY_CEILING = 4.3e12  # B/s, read + write
# warp-instructions per clock per SM, by unit
RATES = {"issue": 4.0, "fp32": 4.0, "alu": 2.0, "mufu": 0.5, "lsu": 1.0}
HGMMA_FLOP_PER_CLK = {"bf16": 4096.0, "f16": 4096.0, "tf32": 2048.0, "e4m3": 8192.0, "e5m2": 8192.0}

RATCHET_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_estimates.json")
RATCHET_SLACK = 1.10
NARROW_SHARE_MAX = 0.25  # of global access instructions may be 16-bit or narrower (scalars, masks)
WIDE_HGMMA_MIN = 0.75  # of HGMMA work must be in N >= 64 instructions


# ---------------------------------------------------------------------------------------------
# SASS reading

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


@dataclass
class Instr:
    addr: int
    op: str  # e.g. "LDG.E.128"
    operands: str


def parse_sass(text: str) -> list[Instr]:
    out = []
    for m in _INSTR.finditer(text):
        out.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return out


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(start, end) address ranges of loops: a branch back to an earlier address closes one."""
    out = []
    for ins in instrs:
        if ins.op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", ins.operands)
            if m and int(m.group(1), 16) < ins.addr:  # a branch to itself ends every kernel: not a loop
                out.append((int(m.group(1), 16), ins.addr))
    return out


def top_level(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [r for r in ranges if not any(o != r and o[0] <= r[0] and r[1] <= o[1] for o in ranges)]


def access_bytes(op: str) -> int | None:
    """Bytes per thread of a global/shared access opcode, None if not a memory access."""
    base = op.split(".")[0]
    if base not in ("LDG", "STG", "LDGSTS", "LDS", "STS", "LD", "ST", "ATOM", "ATOMG", "RED", "REDG", "LDL", "STL"):
        return None
    parts = op.split(".")[1:]
    for p, n in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if p in parts:
            return n
    return 4


def hgmma_shape(op: str) -> tuple[int, int, int, str] | None:
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)\.(?:F32|F16)(?:\.(BF16|TF32|E4M3|E5M2))?", op)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), (m.group(4) or "F16").lower()


def unit_of(op: str) -> str:
    base = op.split(".")[0]
    if base in ("MUFU",):
        return "mufu"
    if access_bytes(op) is not None or base in ("SHFL", "LDSM", "STSM", "UTMALDG", "UTMASTG", "MATCH"):
        return "lsu"
    if base in (
        "FFMA",
        "FADD",
        "FMUL",
        "FMNMX",
        "FSEL",
        "FSETP",
        "FMNMX3",
        "HFMA2",
        "HADD2",
        "HMUL2",
        "FSWZADD",
        "F2FP",
        "F2F",
        "HMNMX2",
        "FRND",
        "FCHK",
    ):
        return "fp32"
    if base in (
        "IMAD",
        "IADD3",
        "LOP3",
        "SHF",
        "LEA",
        "ISETP",
        "PRMT",
        "SEL",
        "IABS",
        "VIADD",
        "IMNMX",
        "LOP",
        "SHL",
        "SHR",
        "I2F",
        "F2I",
        "IADD",
        "BMSK",
        "POPC",
        "FLO",
        "BREV",
        "IDP",
        "VIMNMX",
        "I2FP",
    ):
        return "alu"
    return "issue"


@dataclass
class SassStats:
    registers: int = -1
    stack: int = -1
    shared: int = -1
    local_accesses: int = 0  # LDL / STL
    hgmma: dict = field(default_factory=dict)  # "64x64x16.bf16" -> count
    hmma: int = 0
    global_widths: dict = field(default_factory=dict)  # "LDG.16" -> count (bytes per thread)
    async_copies: int = 0  # LDGSTS + TMA
    loops: int = 0
    loop_hgmma_plain_ldg: bool = False  # a loop with HGMMA whose loads are plain LDG (no LDGSTS/TMA)


def read_sass(sass: str, usage: str) -> tuple[SassStats, list[Instr]]:
    st = SassStats()
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if m:
        st.registers, st.stack, st.shared = int(m.group(1)), int(m.group(2)), int(m.group(3))
    instrs = parse_sass(sass)
    hg, widths = Counter(), Counter()
    for ins in instrs:
        base = ins.op.split(".")[0]
        if base in ("LDL", "STL"):
            st.local_accesses += 1
        if base == "HGMMA":
            s = hgmma_shape(ins.op)
            if s:
                hg[f"{s[0]}x{s[1]}x{s[2]}.{s[3]}"] += 1
        if base == "HMMA":
            st.hmma += 1
        if base in ("LDGSTS", "UTMALDG") or base.startswith("UBLKCP"):
            st.async_copies += 1
        if base in ("LDG", "STG", "LDGSTS"):
            widths[f"{base}.{access_bytes(ins.op)}"] += 1
    st.hgmma, st.global_widths = dict(hg), dict(widths)
    ranges = loops(instrs)
    st.loops = len(ranges)
    for lo, hi in ranges:
        body = [i.op.split(".")[0] for i in instrs if lo <= i.addr <= hi]
        if "HGMMA" in body and "LDG" in body and not any(b in ("LDGSTS", "UTMALDG") for b in body):
            st.loop_hgmma_plain_ldg = True
    return st, instrs


# ---------------------------------------------------------------------------------------------
# compile


@dataclass
class GateResult:
    name: str  # kernel[specialisation summary]
    kernel: str
    key: str
    sass: SassStats = field(default_factory=SassStats)
    uses_dot: bool = False
    error: str = ""
    failures: list = field(default_factory=list)
    waived: list = field(default_factory=list)
    loop_profile: dict = field(default_factory=dict)  # _profile(): straight and per-loop unit counts


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def launch_name(launch) -> str:
    cx = launch.constexpr_by_name()
    ptr = sorted({t for t in launch.signature.values() if t.startswith("*")})
    keep = ",".join(f"{k}={v}" for k, v in cx.items() if not isinstance(v, str) or len(v) < 8)
    ws = f"w{launch.options.get('num_warps')}s{launch.options.get('num_stages')}"
    return f"{launch.kernel}[{'/'.join(ptr)};{keep};{ws}]"


def _unit_counts(ins: Instr, tgt: Counter) -> None:
    base = ins.op.split(".")[0]
    if base == "HGMMA":
        s = hgmma_shape(ins.op)
        if s:
            tgt["hgmma_flop." + s[3]] += 2.0 * s[0] * s[1] * s[2]
        return
    if base == "NOP":
        return
    tgt["issue"] += 1
    u = unit_of(ins.op)
    if u == "lsu":
        nb = access_bytes(ins.op) or 4
        # shared/L1 moves 128 B per clock: a warp-wide 16-byte access takes 4
        tgt["lsu"] += max(1.0, 32 * nb / 128) if base in ("LDS", "STS", "LDSM", "STSM") else 1.0
    elif u != "issue":
        tgt[u] += 1


def _profile(instrs: list[Instr]) -> dict:
    """Per-unit warp-instruction counts (HGMMA as FLOPs per warpgroup instruction) of the straight code and
    of each loop's own body (one iteration), with the loop tree: {"straight": counts, "loops": [{"parent",
    "depth", "size", "counts"}]} in address order."""
    ranges = sorted(set(loops(instrs)))
    parent = []
    for r in ranges:
        outer = [o for o in ranges if o != r and o[0] <= r[0] and r[1] <= o[1]]
        parent.append(ranges.index(min(outer, key=lambda o: o[1] - o[0])) if outer else -1)
    depth = []
    for i in range(len(ranges)):
        d, p = 0, parent[i]
        while p >= 0:
            d, p = d + 1, parent[p]
        depth.append(d)
    straight, own = Counter(), [Counter() for _ in ranges]
    size = [0] * len(ranges)
    for ins in instrs:
        inner = [i for i, (lo, hi) in enumerate(ranges) if lo <= ins.addr <= hi]
        for i in inner:
            size[i] += 1
        if inner:
            _unit_counts(ins, own[max(inner, key=lambda i: depth[i])])
        else:
            _unit_counts(ins, straight)
    return {
        "straight": dict(straight),
        "loops": [{"parent": parent[i], "depth": depth[i], "size": size[i], "counts": dict(own[i])}
                  for i in range(len(ranges))],
    }  # fmt: skip


def _calls_dot(fn, seen=None) -> bool:
    """Whether a @triton.jit function calls tl.dot, itself or through the jit helpers it calls."""
    from triton.runtime.jit import JITFunction

    seen = seen if seen is not None else set()
    if id(fn) in seen:
        return False
    seen.add(id(fn))
    if re.search(r"\btl\.dot\(|\bdot\(", fn.src):
        return True
    glb = fn.fn.__globals__
    for name in set(re.findall(r"\b(_?\w+)\(", fn.src)):
        g = glb.get(name)
        if isinstance(g, JITFunction) and _calls_dot(g, seen):
            return True
    return False


def compile_launch(launch) -> GateResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = GateResult(name=launch_name(launch), kernel=launch.kernel, key=repr(launch.key()))
    res.uses_dot = _calls_dot(launch.fn)
    try:
        src = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(launch.options))
    except Exception as exc:  # a compile failure is a gate failure, reported by name
        msg = str(exc).strip().splitlines()
        res.error = f"{type(exc).__name__}: {' '.join(msg[-3:])[:400] if msg else ''}"
        res.failures.append("[compile] does not compile for sm_90 as launched")
        return res
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    st, instrs = read_sass(sass, usage)
    st.shared = max(st.shared, int(ck.metadata.shared))
    res.sass = st
    res.loop_profile = _profile(instrs)
    judge(res)
    apply_waivers(res, launch)
    return res


# Accepted findings, each with its reason: (kernel, rule) -> [(launches it covers, reason)]. "Launches it covers"
# is a dict of constexprs / int arguments that must all match (a callable value is a predicate on the value).
# A waiver that no longer matches a finding fails the gate too (tests/test_sm90_gate.py), so this list only
# shrinks with the kernels.
def _small(n):
    return isinstance(n, int) and n <= 16


_FOUR_CHANNELS = (
    "the VAE's 4-channel convs (post_quant_conv 4->4 1x1x1, conv1 4->512, conv_out 128->4): 4 bf16 channels are "
    "8 bytes per position, and the runtime channel mask makes Triton emit 2-byte accesses; N >= 64 HGMMA would be "
    "15/16 zeros; these convs are < 1% of the decode's FLOPs (2026-11-30)"
)
WAIVERS: dict[tuple[str, str], list] = {
    ("_attention_bwd_kernel", "narrow_hgmma"): [
        (
            {"D": 72},
            "the fused backward design (BWD_DESIGN='fused', recorded for comparison; the default split design has "
            "no narrow HGMMA): S^T, dP^T, dV and dK run as 64x64x16; dQ (64 queries x D 72) is split over the two "
            "warpgroups of 8 warps into N=32 pieces plus the 8-column tail of D=72 (28% of MMA work); one "
            "warpgroup (4 warps, dQ at N=64) spilled 24-208 B in every variant tried (2026-11-30)",
        )
    ],
}
_D128_BWD = (
    "OPEN (issue 9): flash_attn_func at head_dim 128 only (STDiT3 uses 72): the split backward's dK/dV kernel "
    "holds two 64 x 128 fp32 accumulators (128 registers a thread at 4 warps); with 2 stages it spilled 32 B, "
    "8 warps over 128 keys 8 B, 32 queries per step ran half its MMA work at N = 32, so its query loop loads "
    "q / dO without async copies (1 stage). The fused kernel there used mma.sync (2026-11-30)"
)
WAIVERS[("_attention_bwd_dkdv_kernel", "plain_ldg_loop")] = [({"D": 128}, _D128_BWD)]
for _rule in ("narrow_global", "narrow_hgmma", "plain_ldg_loop"):
    WAIVERS[("_causal_conv3d_fwd_kernel", _rule)] = [
        ({"FAST": False, "c_in": _small}, _FOUR_CHANNELS),
        ({"FAST": False, "c_out": _small}, _FOUR_CHANNELS),
    ]


def rule_of(failure: str) -> str:
    m = re.match(r"\[(\w+)\]", failure)
    return m.group(1) if m else ""


def _covers(cond: dict, args: dict) -> bool:
    for k, want in cond.items():
        v = args.get(k)
        if callable(want):
            if not want(v):
                return False
        elif v != want:
            return False
    return True


def apply_waivers(res: GateResult, launch) -> None:
    args = {**{k: v for k, v in launch.args.items() if not isinstance(v, tuple)}, **launch.constexpr_by_name()}
    keep = []
    for f in res.failures:
        why = next((r for c, r in WAIVERS.get((res.kernel, rule_of(f)), []) if _covers(c, args)), None)
        if why:
            res.waived.append(f"{f} -- waived: {why}")
        else:
            keep.append(f)
    res.failures = keep


def judge(res: GateResult) -> None:
    st = res.sass
    if st.stack > 0 or st.local_accesses:
        res.failures.append(f"[spill] stack {st.stack} B, {st.local_accesses} LDL/STL")
    if st.shared > SM90_MAX_SHARED:
        res.failures.append(f"[smem] shared memory {st.shared} B > {SM90_MAX_SHARED} B")
    if res.uses_dot:
        if st.hmma:
            res.failures.append(f"[hmma] {st.hmma} HMMA (pre-Hopper mma.sync) instead of HGMMA")
        work = {k: int(k.split("x")[1]) * n for k, n in st.hgmma.items()}
        total = sum(work.values())
        if not total:
            res.failures.append("[no_hgmma] tl.dot kernel without HGMMA (no wgmma)")
        else:
            wide = sum(w for k, w in work.items() if int(k.split("x")[1]) >= 64) / total
            if wide < WIDE_HGMMA_MIN:
                res.failures.append(
                    f"[narrow_hgmma] HGMMA narrower than N=64 carries {100 * (1 - wide):.0f}% of MMA work "
                    f"({', '.join(f'{k} x{n}' for k, n in sorted(st.hgmma.items()))})"
                )
        if st.loop_hgmma_plain_ldg:
            res.failures.append("[plain_ldg_loop] a loop feeds HGMMA from plain LDG (no LDGSTS / TMA async copies)")
    w = st.global_widths
    n_all = sum(w.values())
    narrow = sum(n for k, n in w.items() if int(k.split(".")[1]) <= 2)
    if n_all and narrow >= 8 and narrow / n_all > NARROW_SHARE_MAX:
        res.failures.append(
            f"[narrow_global] {narrow} of {n_all} global accesses are 16-bit or narrower "
            f"({', '.join(f'{k}B x{n}' for k, n in sorted(w.items()))})"
        )


# ---------------------------------------------------------------------------------------------
# trip counts of the hot (top-level) loops per program, from the launch's arguments


def _cdiv(a, b):
    return -(-int(a) // max(int(b), 1))


def trip_count(launch, kv_lens: tuple | None = None) -> tuple | None:
    """Iterations per program of the hot loop at each nesting depth (outermost first) at this launch's
    arguments; None when the kernel family has no model. At each depth the biggest loop of a parent (the most
    instructions) is the hot one; its siblings (masked diagonal blocks, zero-fill tails) count one iteration.
    ``kv_lens``: the real key lengths of a varlen launch (its ``Lk`` is the bucketed autotune key, e.g. 512
    for 300-token captions): key loops then run the mean over sequences of their own block counts."""
    a = {**launch.args, **launch.constexpr_by_name()}
    k, g = launch.kernel, launch.grid

    def half(n):
        return max(1, n // 2) if a.get("causal") else n

    def key_blocks(block):
        if a.get("VARLEN") and kv_lens:
            return sum(_cdiv(n, block) for n in kv_lens) / len(kv_lens)
        return _cdiv(a["Lk"], block)

    try:
        if k == "_attention_fwd_kernel":
            return (half(key_blocks(a["BLOCK_N"])),)
        if k == "_attention_bwd_kernel":  # key blocks of this split, then every query block
            return (key_blocks(a["n_split"] * a["BLOCK_N"]), half(_cdiv(a["Lq"], a["BLOCK_M"])))
        if k == "_attention_bwd_dkdv_kernel":  # one key block, every visible query block
            return (half(_cdiv(a["Lq"], a["BLOCK_M"])),)
        if k == "_attention_bwd_dq_kernel":  # one query block, every visible key block
            return (half(_cdiv(a["Lk"], a["BLOCK_N"])),)
        if k == "_dq_reduce_kernel":
            return (a["n_split"],)
        if "rows_per_prog" in a:
            return (_cdiv(a["rows_per_prog"], a.get("BLOCK_M") or a.get("BLOCK_R") or 1),)
        if "n_rows" in a and "BLOCK_M" in a:  # grid-stride loop over row blocks
            return (_cdiv(_cdiv(a["n_rows"], a["BLOCK_M"]), g[0]),)
        if k.startswith("_temporal_attention"):  # the split backward's dQ kernel: its key blocks
            return (max(1, a["BLOCK"] // a.get("BLOCK_M", a["BLOCK"])),)
        if "s_chunk" in a and "TILE" in a:
            return (_cdiv(a["s_chunk"], a["TILE"] // (a["GPP"] * a["CG_P"])),)
        if "m_chunk" in a:
            return (_cdiv(a["m_chunk"], a["BLOCK_K"]),)
        if "K" in a and "BLOCK_K" in a:  # a GEMM's reduction loop
            return (_cdiv(a["K"], a["BLOCK_K"]),)
        if "KT" in a and "c_in" in a:
            red = a["c_out"] if "dx" in k else a["c_in"]
            return (a["KT"] * a["KH"] * a["KW"] * _cdiv(red, a["BLOCK_K"]),)
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return None


def _loop_multipliers(prof: dict, trips: tuple) -> list[float]:
    """Iterations of each loop of ``prof`` per program: the product of its own and its ancestors' factors."""
    lps = prof["loops"]
    factor = [1.0] * len(lps)
    for par in {lp["parent"] for lp in lps}:
        kids = [i for i, lp in enumerate(lps) if lp["parent"] == par]
        hot = max(kids, key=lambda i: lps[i]["size"])
        d = lps[hot]["depth"]
        factor[hot] = float(trips[d]) if d < len(trips) else 1.0
    mult = []
    for i in range(len(lps)):
        m, p = factor[i], lps[i]["parent"]
        while p >= 0:
            m, p = m * factor[p], lps[p]["parent"]
        mult.append(m)
    return mult


def _launch_bytes(launch) -> float:
    """Bytes of the distinct tensors a launch is given: each read or written once at least (dummies passed for
    absent operands are usually another argument's tensor and count once)."""
    total, seen = 0.0, set()
    for v in launch.args.values():
        if isinstance(v, TensorArg):
            if v.ident in seen:
                continue
            seen.add(v.ident)
            size = {"bfloat16": 2, "float16": 2, "float32": 4, "int32": 4, "int64": 8, "bool": 1}.get(v.dtype, 2)
            total += size * math.prod(v.shape)
    return total


def estimate_launch(launch, res: GateResult, kv_lens: tuple | None = None) -> dict:
    """Static time estimate of one launch (seconds) and what bounds it (``kv_lens``: see ``trip_count``)."""
    if res.error:
        return {"s": None, "bound": "no compile"}
    trips = trip_count(launch, kv_lens)
    prof = res.loop_profile or {"straight": {}, "loops": []}
    if prof["loops"] and trips is None:
        return {"s": None, "bound": "no trip model"}
    mults = _loop_multipliers(prof, trips or ())
    warps = int(launch.options.get("num_warps", 4))
    per_cta = Counter()
    parts = [(prof["straight"], 1.0)] + [(lp["counts"], m) for lp, m in zip(prof["loops"], mults)]
    for src, mult in parts:
        for u, n in src.items():
            if u.startswith("hgmma_flop."):
                # one HGMMA per warpgroup; the SASS counts it once per warp -> x warps / 4 warpgroups
                per_cta["tensor"] += n * mult * (warps / 4) / HGMMA_FLOP_PER_CLK.get(u.split(".")[1], 4096.0)
            else:
                per_cta[u] += n * mult * warps / RATES[u]
    ctas = math.prod(launch.grid)
    st = res.sass
    threads = 32 * warps
    occ = min(
        REGS_PER_SM // max(1, st.registers * threads),
        SM90_SHARED_PER_SM // max(1, st.shared) if st.shared > 0 else 32,
        MAX_WARPS_PER_SM // warps,
        32,
    )
    occ = max(1, occ)
    # Per CTA: its tensor-core time and its busiest other unit, serialised (Triton waits on each wgmma
    # before using its result), so one CTA takes t_tensor + t_other. Resident CTAs overlap each other:
    # per SM, n CTAs take at least n x each unit's time and ceil(n / occ) x one CTA's time.
    t_tensor = per_cta.pop("tensor", 0.0)
    other_unit, t_other = max(per_cta.items(), key=lambda kv: kv[1]) if per_cta else ("issue", 0.0)
    n = math.ceil(ctas / SMS)
    waves = math.ceil(n / occ)
    sm_cycles = max(n * t_tensor, n * t_other, waves * (t_tensor + t_other))
    bound_unit = "tensor" if t_tensor >= t_other else other_unit
    s_compute = sm_cycles / CLOCK_HZ
    s_mem = _launch_bytes(launch) / COPY_CEILING
    bound = bound_unit if s_compute >= s_mem else "hbm"
    return {"s": max(s_compute, s_mem), "bound": bound, "trips": trips, "occupancy": occ, "waves": waves}


# ---------------------------------------------------------------------------------------------
# the gate


_WORKER: dict = {}


def _record_cases(names=None):
    from opensora_fast.kernels._record import recording
    from opensora_fast.kernels._sm90_cases import cases

    out = []
    for case in cases():
        if names and case.name not in names:
            continue
        try:
            with recording() as rec:
                case.run()
            out.append((case, rec, ""))
        except Exception as exc:  # a case that cannot even be recorded fails the gate
            out.append((case, None, f"{type(exc).__name__}: {exc}"[:500]))
    return out


def _worker_init(names):
    _WORKER["launches"] = {}
    for _case, rec, _err in _record_cases(names):
        if rec is not None:
            for launch in rec.unique():
                _WORKER["launches"].setdefault(repr(launch.key()), launch)


def _compile_key(key: str) -> GateResult:
    return compile_launch(_WORKER["launches"][key])


def run_gate(case_names=None, jobs: int = 0):
    """Record every case, compile every distinct launch (all autotune configs), estimate every case."""
    from concurrent.futures import ProcessPoolExecutor

    recorded = _record_cases(case_names)
    keys = []
    for _case, rec, _err in recorded:
        if rec is not None:
            for launch in rec.unique():
                k = repr(launch.key())
                if k not in keys:
                    keys.append(k)
    jobs = jobs or min(4, os.cpu_count() or 1)
    with ProcessPoolExecutor(jobs, initializer=_worker_init, initargs=(case_names,)) as pool:
        results = dict(zip(keys, pool.map(_compile_key, keys)))
    table = []
    for case, rec, err in recorded:
        row = {"case": case.name, "note": case.note, "error": err, "floor_s": None, "est_s": None,
               "kernels": {}, "bound": ""}  # fmt: skip
        if case.has_floor:
            row["floor_s"] = max(case.flops / MATMUL_CEILING, case.bytes / COPY_CEILING)
        if rec is None:
            table.append(row)
            continue
        by_call: dict[int, list] = {}
        for launch in rec.launches:
            by_call.setdefault(launch.call, []).append(launch)
        total, complete, bounds = 0.0, True, Counter()
        for launches in by_call.values():
            ests = [(estimate_launch(lc, results[repr(lc.key())], case.kv_lens), lc) for lc in launches]
            ok = [(e, lc) for e, lc in ests if e["s"] is not None]
            if not ok:
                complete = False
                continue
            best, lc = min(ok, key=lambda el: el[0]["s"])
            total += best["s"]
            bounds[best["bound"]] += best["s"]
            row["kernels"][lc.kernel] = row["kernels"].get(lc.kernel, 0.0) + best["s"]
        row["est_s"] = total if complete else None
        row["bound"] = bounds.most_common(1)[0][0] if bounds else ""
        table.append(row)
    return list(results.values()), table


def check_ratchet(table, path=RATCHET_FILE) -> list[str]:
    if not os.path.exists(path):
        return [f"no committed estimates at {path} (run --write-ratchet)"]
    with open(path) as f:
        old = json.load(f)["cases"]
    bad = []
    for row in table:
        prev = old.get(row["case"])
        if prev is None or prev.get("est_ms") is None:
            continue
        if row["est_s"] is None:
            bad.append(f"{row['case']}: no estimate now (was {prev['est_ms']:.3f} ms)")
        elif row["est_s"] * 1e3 > prev["est_ms"] * RATCHET_SLACK:
            bad.append(
                f"{row['case']}: estimate {row['est_s'] * 1e3:.3f} ms > {RATCHET_SLACK:.2f} x committed "
                f"{prev['est_ms']:.3f} ms"
            )
    return bad


def write_ratchet(table, path=RATCHET_FILE) -> None:
    cases = {
        r["case"]: {
            "est_ms": None if r["est_s"] is None else round(r["est_s"] * 1e3, 4),
            "floor_ms": None if r["floor_s"] is None else round(r["floor_s"] * 1e3, 4),
            "bound": r["bound"],
        }
        for r in table
    }
    doc = {"what": "static sm_90 time estimates (not measurements) of kernels._sm90_cases; a ratchet",
           "model": "kernels/_sm90.py docstring and NOTES.md", "cases": cases}  # fmt: skip
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def perf_table(table) -> str:
    lines = ["| case | floor ms | estimate ms | estimate / floor | bound | kernels (estimate ms) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(table, key=lambda r: r["floor_s"] is None):  # cases with a floor first
        fl, est = r["floor_s"], r["est_s"]
        ratio = f"{est / fl:.2f}" if est and fl else "-"
        ks = ", ".join(f"{k.strip('_')} {v * 1e3:.3f}" for k, v in sorted(r["kernels"].items(), key=lambda kv: -kv[1]))
        est_s = f"{est * 1e3:.3f}" if est else ("ERROR " + r["error"][:60] if r["error"] else "-")
        fl_s = f"{fl * 1e3:.3f}" if fl else "-"
        lines.append(f"| {r['case']} | {fl_s} | {est_s} | {ratio} | {r['bound']} | {ks} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Compile what runs for sm_90, check its SASS, estimate its time.")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--case", action="append", help="only these cases (by name)")
    p.add_argument("--perf", action="store_true", help="print the estimate table (markdown)")
    p.add_argument("--check-ratchet", action="store_true", help="fail if an estimate is > 10%% worse than committed")
    p.add_argument("--write-ratchet", action="store_true", help="rewrite sm90_estimates.json from this run")
    p.add_argument("--jobs", type=int, default=0)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to run the sm_90 gate", file=sys.stderr)
        return 2
    results, table = run_gate(args.case, args.jobs)
    print(f"{'kernel launch (specialisation as the runtime builds it)':110s} {'regs':>4s} {'stk':>3s} "
          f"{'smem':>6s}  status")  # fmt: skip
    for r in results:
        status = "ok" if not r.failures else "FAIL: " + "; ".join(r.failures) + (f" [{r.error}]" if r.error else "")
        if r.waived:
            status += " (" + "; ".join(r.waived) + ")"
        print(f"{r.name[:110]:110s} {r.sass.registers:4d} {r.sass.stack:3d} {r.sass.shared:6d}  {status}")
    failed_cases = [row for row in table if row["error"]]
    for row in failed_cases:
        print(f"CASE FAILED {row['case']}: {row['error']}")
    print(
        f"\n{len(results)} launches compiled, {sum(bool(r.failures) for r in results)} failing; "
        f"{len(table)} cases, {len(failed_cases)} not recorded"
    )
    if args.perf:
        print("\nStatic estimates (NOT measurements; model in kernels/_sm90.py):\n")
        print(perf_table(table))
    rc = 1 if any(r.failures for r in results) or failed_cases else 0
    if args.check_ratchet:
        bad = check_ratchet(table)
        for b in bad:
            print("RATCHET:", b)
        rc = rc or (1 if bad else 0)
    if args.write_ratchet:
        write_ratchet(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"launches": [asdict(r) for r in results], "cases": table}, f, indent=1, default=str)
    return rc


if __name__ == "__main__":
    sys.exit(main())

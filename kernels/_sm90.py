"""Hopper (sm_90) ahead-of-time compile gate, runnable without a GPU.

Each kernel module lists its launchable configurations as :class:`KernelSpec` from ``sm90_specs()``.
:func:`compile_spec` builds a real sm_90 cubin with ``triton.compile`` and reads registers, stack
frame (spills), shared memory and SASS (HGMMA = wgmma) with the ``cuobjdump`` shipped in Triton.

Run ``python -m opensora_fast.kernels._sm90`` for a table. It must run with ``TRITON_INTERPRET``
unset (the interpreter replaces ``@triton.jit`` functions), so tests call it in a subprocess.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

# Shared memory one block may use on sm_90 (227 KiB) and the register file per thread.
SM90_MAX_SHARED = 232448
MODULES = (
    "layernorm_modulate",
    "qk_norm_rope",
    "attention",
    "causal_conv3d",
    "group_norm_silu",
)


@dataclass
class KernelSpec:
    """One launchable configuration of one Triton kernel."""

    name: str  # readable id, e.g. "layernorm_modulate_fwd[bf16,C=1152]"
    fn: object  # the @triton.jit function
    signature: dict  # arg name -> "*bf16" | "i32" | "fp32" | "constexpr"
    constexprs: dict  # arg name -> value
    num_warps: int = 4
    num_stages: int = 3
    uses_dot: bool = False
    # args the launcher always passes 16-divisible (Triton specialises these at run time); None = every
    # pointer, which holds for torch allocations and the model's views (C * element size % 16 == 0)
    divisible_by_16: tuple | None = None


def _attrs(spec: KernelSpec) -> dict:
    names = spec.divisible_by_16
    if names is None:
        names = [a for a, t in spec.signature.items() if t.startswith("*")]
    return {(spec.fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in names}


def signature(fn, pointers: dict | str, constexprs: dict, scalars: dict | None = None) -> dict:
    """Build a compile signature: constexprs by name; pointers (args starting with an upper-case
    letter or ending in ``_ptr``) typed from ``pointers`` (a dtype string or {name: dtype} with key
    "*" as default); other args "i32" unless given in ``scalars`` (e.g. {"eps": "fp32"})."""
    scalars = scalars or {}
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in scalars:
            sig[a] = scalars[a]
        elif a[0].isupper() or a.endswith("_ptr"):  # ints are lower-case by convention
            dt = pointers if isinstance(pointers, str) else pointers.get(a, pointers.get("*"))
            sig[a] = "*" + dt
        else:
            sig[a] = "i32"
    return sig


@dataclass
class GateResult:
    name: str
    registers: int = -1
    stack: int = -1
    shared: int = -1
    hgmma: int = 0
    uses_dot: bool = False
    error: str = ""
    failures: list = field(default_factory=list)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec: KernelSpec) -> GateResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = GateResult(name=spec.name, uses_dot=spec.uses_dot)
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=_attrs(spec))
        ck = triton.compile(
            src,
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as exc:  # a compile failure is a gate failure, reported by name
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        res.failures.append("does not compile for sm_90")
        return res
    res.shared = int(ck.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if m:
        res.registers, res.stack = int(m.group(1)), int(m.group(2))
    res.hgmma = sass.count("HGMMA")
    if res.stack != 0:
        res.failures.append(f"stack frame {res.stack} B (register spills)")
    if res.shared > SM90_MAX_SHARED:
        res.failures.append(f"shared memory {res.shared} B > {SM90_MAX_SHARED} B")
    if spec.uses_dot and res.hgmma == 0:
        res.failures.append("tl.dot kernel without HGMMA (no wgmma)")
    return res


def collect_specs(modules=MODULES) -> list[KernelSpec]:
    specs = []
    for mod in modules:
        try:
            m = importlib.import_module(f"opensora_fast.kernels.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name == f"opensora_fast.kernels.{mod}":
                continue  # module not written yet
            raise
        specs.extend(m.sm90_specs())
    return specs


def run_gate(modules=MODULES, jobs: int = 0) -> list[GateResult]:
    from concurrent.futures import ProcessPoolExecutor

    names = [s.name for s in collect_specs(modules)]
    jobs = jobs or min(4, os.cpu_count() or 1)
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_by_name, [(modules, n) for n in names]))


def _compile_by_name(arg) -> GateResult:
    modules, name = arg
    spec = next(s for s in collect_specs(modules) if s.name == name)
    return compile_spec(spec)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Compile every kernel config for sm_90 and check it.")
    p.add_argument("--json", help="write results to this file")
    p.add_argument("--module", action="append", help="only these kernel modules")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to run the sm_90 gate", file=sys.stderr)
        return 2
    results = run_gate(tuple(args.module) if args.module else MODULES)
    print(f"{'kernel config':64s} {'regs':>5s} {'stack':>5s} {'smem':>7s} {'hgmma':>5s}  status")
    for r in results:
        status = "ok" if not r.failures else "FAIL: " + "; ".join(r.failures)
        print(f"{r.name:64s} {r.registers:5d} {r.stack:5d} {r.shared:7d} {r.hgmma:5d}  {status}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

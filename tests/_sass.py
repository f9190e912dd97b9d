"""Loop statistics of the sm_90 machine code of the launches a snippet makes (no GPU), for tests that pin a
kernel's hot loop. Runs in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_BODY = r"""
import os, subprocess, tempfile, triton
from opensora_fast.kernels._sm90 import loops as sass_loops, parse_sass
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = []
for lc in launches:
    if KERNEL is not None and lc.name != KERNEL:
        continue
    ck = lc.compile()
    st = sass_stats(ck)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    ins = parse_sass(sass)
    loops = []
    for lo, hi in sass_loops(ins):
        body = [i.op for i in ins if lo <= i.addr <= hi]
        loops.append(dict(size=len(body), mufu=sum(op.startswith("MUFU") for op in body)))
    row = {k: lc.kwargs.get(k) for k in KEYS}
    row.update(warps=lc.kwargs.get("num_warps"), regs=st["regs"], stack=st["stack"], loops=loops)
    out.append(row)
print(json.dumps(out))
"""


def launch_loops(setup: str, kernel: str | None, keys: tuple[str, ...]) -> list[dict]:
    """``setup``: Python that fills ``launches`` with ``tests.test_attention.capture_launches()`` (imported for
    it, with torch and importlib). Returns, per launch of ``kernel`` (None: every one), the ``keys`` of its
    config, warps, registers, stack and its loops' instruction and MUFU counts (a backward branch closes one)."""
    head = "import importlib, json, torch\nfrom tests.test_attention import capture_launches, sass_stats\n"
    code = head + setup + f"\nKERNEL = {kernel!r}\nKEYS = {tuple(keys)!r}\n" + _BODY
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

"""Loop statistics of the sm_90 machine code of the launches a snippet makes (no GPU), for tests that pin a
kernel's hot loop. Runs in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_BODY = r"""
from opensora_fast.kernels._sm90 import compile_launch
out = []
for lc in launches:
    if KERNEL is not None and lc.kernel != KERNEL:
        continue
    res = compile_launch(lc)
    assert not res.error, res.error
    named = lc.named()
    row = {k: named.get(k) for k in KEYS}
    loops = [dict(size=lp["size"], mufu=lp["counts"].get("mufu", 0)) for lp in res.loop_profile["loops"]]
    row.update(warps=lc.options.get("num_warps"), regs=res.sass.registers, stack=res.sass.stack, loops=loops)
    out.append(row)
print(json.dumps(out))
"""


def launch_loops(setup: str, kernel: str | None, keys: tuple[str, ...]) -> list[dict]:
    """``setup``: Python that records launches with ``recording()`` (``kernels._record``; imported for it,
    with torch and importlib) and sets ``launches = rec.launches``. Returns, per launch of ``kernel`` (None:
    every one), the ``keys`` of its config, warps, registers, stack and its loops' instruction and MUFU counts
    (a backward branch closes one)."""
    head = "import importlib, json, torch\nfrom opensora_fast.kernels._record import recording\n"
    code = head + setup + f"\nKERNEL = {kernel!r}\nKEYS = {tuple(keys)!r}\n" + _BODY
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

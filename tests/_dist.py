"""Helpers for the multi-process (torchrun, gloo) tests."""

import os
import socket
import subprocess
import sys


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's --master_port / a tcp:// init_method)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command line of ``torchrun --nproc_per_node nproc --master_port <free> *args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *args]  # fmt: skip


def run_cli(nproc: int, *args: str, cwd=None, timeout: int = 300) -> str:
    """``torchrun --nproc_per_node nproc -m opensora_fast.cli *args`` (one thread per process); asserts it
    exits 0 (showing the end of its output otherwise) and returns its stdout."""
    cmd = torchrun(nproc, "-m", "opensora_fast.cli", *args)
    r = subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout

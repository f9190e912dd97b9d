"""Helpers for the multi-process (torchrun, gloo) tests."""

import socket
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

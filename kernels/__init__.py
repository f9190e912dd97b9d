"""opensora_fast.kernels: Triton kernels (forward and backward) for Open-Sora 1.2, each with a
plain-PyTorch reference in ``reference.py`` that is also the CPU path.

CUDA tensors run Triton, CPU tensors the reference; ``OPENSORA_FAST_BACKEND=reference|triton``
forces one (Triton on CPU needs ``TRITON_INTERPRET=1``).
"""

from opensora_fast.kernels import reference
from opensora_fast.kernels._utils import backend, use_triton

__all__ = [
    "backend",
    "reference",
    "use_triton",
]

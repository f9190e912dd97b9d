"""opensora-fast: Triton kernels and a thin model package for Open-Sora 1.2 (STDiT3 + causal 3D VAE)."""

from opensora_fast import kernels

__version__ = "0.1.0"
__all__ = ["kernels", "__version__"]

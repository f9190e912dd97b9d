"""opensora-fast: Triton kernels and a thin model package for Open-Sora 1.2 (STDiT3 + causal 3D VAE)."""

from opensora_fast import kernels

__version__ = "0.1.0"
__all__ = ["apply", "kernels", "__version__"]


def apply(model):
    """Run an Open-Sora 1.2 STDiT3 (built by Open-Sora's code) on opensora_fast's kernels, in place;
    see :func:`opensora_fast.patch.apply`."""
    from opensora_fast.patch import apply as _apply

    return _apply(model)

"""opensora-fast: Triton kernels and a thin model package for Open-Sora 1.2 (STDiT3 + causal 3D VAE).

Submodules load on first use, so a program (or ``opensora-fast check``) can set ``TRITON_INTERPRET``
before the Triton kernels are defined.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["apply", "kernels", "models", "__version__"]


def apply(model, *, sp_group=None, overlap: bool = True):
    """Run an Open-Sora 1.2 STDiT3 (built by Open-Sora's code) on opensora_fast's kernels, in place;
    see :func:`opensora_fast.patch.apply` (``sp_group``, ``overlap``: its sequence-parallel blocks)."""
    from opensora_fast.patch import apply as _apply

    return _apply(model, sp_group=sp_group, overlap=overlap)


def __getattr__(name):
    if name in ("kernels", "models"):
        return importlib.import_module(f"opensora_fast.{name}")
    raise AttributeError(f"module 'opensora_fast' has no attribute {name!r}")

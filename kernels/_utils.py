"""Shared plumbing for the Triton kernels: backend choice, autotune configs, input checks.

Every kernel module follows one pattern (see ``layernorm_modulate.py``):

- private ``@triton.jit`` kernels ``_<k>_fwd_kernel`` / ``_<k>_bwd_kernel``;
- host launchers wrapped as ``torch.library`` custom ops ``opensora_fast::<k>_fwd`` / ``_bwd``
  (with fake implementations, so ``torch.compile`` traces them without graph breaks);
- an ``autograd.Function`` calling those ops;
- a small public function that validates its input and dispatches on :func:`use_triton`;
- a plain-PyTorch reference in ``kernels/reference.py`` (the CPU path);
- ``sm90_specs()`` listing every launchable configuration for the Hopper compile gate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
from opensora_fast.kernels._record import active as _recording

BACKEND_ENV = "OPENSORA_FAST_BACKEND"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend() -> str:
    """The forced backend from ``OPENSORA_FAST_BACKEND`` ("reference" | "triton"), or "auto"."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "reference", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be 'reference', 'triton' or unset, got {value!r}")
    return value


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Decide whether an op runs its Triton kernels (True) or its PyTorch reference (False).

    CUDA tensors run Triton, CPU tensors run the reference, unless ``OPENSORA_FAST_BACKEND`` forces
    one. Forcing Triton on CPU tensors needs the interpreter; without it this raises instead of
    silently falling back.
    """
    if _recording() is not None:  # kernels._record: launches are recorded, never run
        return True
    ts = [t for t in tensors if t is not None]
    on_cuda = bool(ts) and ts[0].is_cuda
    choice = backend()
    if choice == "reference":
        return False
    if choice == "triton":
        if not on_cuda and not interpreting():
            raise RuntimeError(
                f"{BACKEND_ENV}=triton with CPU tensors needs TRITON_INTERPRET=1 (set before "
                "opensora_fast is imported); unset it to use the PyTorch reference on CPU"
            )
        return True
    return on_cuda


def autotune_configs(configs: Sequence[triton.Config]) -> list[triton.Config]:
    """All configs on a GPU; only the first under the interpreter (autotuning needs a driver)."""
    return list(configs[:1]) if interpreting() else list(configs)


# --------------------------------------------------------------------------------------------
# input validation: every error names the argument and what was expected


def check_tensor(
    t,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    floating: bool = True,
    like: torch.Tensor | None = None,
) -> None:
    """Raise ValueError naming ``name`` when ``t`` is not the tensor described.

    ``shape`` entries of None are free; ``like`` requires the same device (and, for floating
    tensors, that both are floating point).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            dims = ["*" if s is None else str(s) for s in shape]
            want = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (fp32/fp16/bf16), got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}; put both on one device")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


POISON_ENV = "OPENSORA_FAST_POISON"


def empty(shape, dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled when ``OPENSORA_FAST_POISON=1`` (tests set it),
    so an element a kernel forgets to write shows up as NaN instead of stale memory."""
    if os.environ.get(POISON_ENV, "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)

"""Record the Triton launches that real calls make, without running them and without a GPU.

Inside :func:`recording`, the public ops take their Triton path on any device (CPU or ``meta`` tensors:
a 720p model costs no memory on ``meta``), ``JITFunction.run`` is replaced by a recorder, and the
autotuner records one launch per config it would benchmark. Each :class:`Launch` holds what the runtime
would compile: the specialisation Triton's own binder derives from the argument values (pointer dtypes,
16-byte divisibility of pointers and integers), the constexprs, the compile options and the grid.

A ``meta`` tensor's ``data_ptr()`` is its byte offset from a 0 base: a fresh allocation is taken as
16-byte aligned (the CUDA caching allocator aligns to 512 B) and a view keeps its real offset, so the
divisibility that a view such as ``qkv[..., C:]`` has on a GPU is the one recorded here.

Used by the sm_90 gate (``_sm90``), by tests (grids within CUDA limits at 720p, pointer types) and as a
library: ``with recording() as rec: op(...)`` then ``rec.launches``. Under ``TRITON_INTERPRET=1`` (where
``@triton.jit`` gives interpreter functions) launches are recorded the same way, bound through a
``JITFunction`` of the same Python function.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.utils._python_dispatch

# Hopper: GPUTarget("cuda", 90, 32); H200 has 132 SMs.
SM90_TARGET = ("cuda", 90, 32)
H200_SMS = 132
# CUDA's launch limits: grid x < 2^31, y and z <= 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)

_state = threading.local()


class TensorArg(NamedTuple):
    """A tensor argument as recorded: no data, only what the runtime and the launch-limit checks read."""

    dtype: str  # "bfloat16", "float32", ...
    shape: tuple
    ident: int  # id() of the tensor: the same tensor passed twice has one identity
    stride: tuple

    def max_offset(self) -> int:
        """Largest element offset from the first element (views and stride-0 expansions included)."""
        return sum((n - 1) * abs(st) for n, st in zip(self.shape, self.stride)) if all(self.shape) else 0


def active() -> Recorder | None:
    """The recorder of the current thread, or None outside :func:`recording`."""
    return getattr(_state, "recorder", None)


@dataclass
class Launch:
    """One kernel launch as the runtime would compile and launch it on sm_90."""

    kernel: str  # the @triton.jit function's name
    fn: object  # the JITFunction
    signature: dict  # arg name -> "*bf16" | "i32" | "i64" | "fp32" | "constexpr" ...
    constexprs: dict  # (index,) -> value, as JITFunction._pack_args gives them
    attrs: dict  # (index,) -> [["tt.divisibility", 16]] ...
    options: dict  # num_warps, num_stages, ...
    grid: tuple
    autotuned: bool = False
    call: int = 0  # one number per launch site call: the configs one autotuner call tries share it
    args: dict = field(default_factory=dict)  # arg name -> value (numbers, None) or TensorArg

    def named(self) -> dict:
        """Every argument by name: the runtime values (tensors as TensorArg) and the constexprs."""
        return {**self.args, **self.constexpr_by_name()}

    def key(self) -> tuple:
        """Identity of the compiled binary: same key, same cubin."""
        cx = tuple(sorted((k, repr(v)) for k, v in self.constexprs.items()))
        at = tuple(sorted((k, repr(v)) for k, v in self.attrs.items()))
        opts = (self.options.get("num_warps"), self.options.get("num_stages"), self.options.get("maxnreg"))
        return (self.kernel, tuple(self.signature.items()), cx, at, opts)

    def constexpr_by_name(self) -> dict:
        names = self.fn.arg_names
        return {names[k[0]]: v for k, v in self.constexprs.items() if len(k) == 1}

    def divisible(self) -> list[str]:
        """Names of the arguments the binder marked 16-divisible."""
        names = self.fn.arg_names
        return [names[k[0]] for k, v in self.attrs.items() if len(k) == 1 and "tt.divisibility" in repr(v)]


class Recorder:
    def __init__(self, sms: int = H200_SMS):
        self.launches: list[Launch] = []
        self.sms = sms
        self.calls = 0
        self._backend = None

    @property
    def backend(self):
        if self._backend is None:
            from triton.backends.compiler import GPUTarget
            from triton.compiler.compiler import make_backend

            self._backend = make_backend(GPUTarget(*SM90_TARGET))
        return self._backend

    def unique(self) -> list[Launch]:
        """One launch per compiled binary (first seen)."""
        seen, out = set(), []
        for launch in self.launches:
            k = launch.key()
            if k not in seen:
                seen.add(k)
                out.append(launch)
        return out

    def record(self, fn, args, kwargs, grid, autotuned: bool, call: int) -> None:
        from triton.runtime.jit import create_function_from_signature

        binder = getattr(fn, "_osf_sm90_binder", None)
        if binder is None:
            binder = create_function_from_signature(fn.signature, fn.params, self.backend)
            fn._osf_sm90_binder = binder
        kwargs = {k: v for k, v in kwargs.items() if k not in ("warmup",)}
        bound_args, specialization, options = binder(*args, **kwargs)
        opts, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization, options)
        if callable(grid):
            grid = grid(bound_args)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))  # (x, y, z)
        desc = {}
        for name, v in bound_args.items():
            if isinstance(v, torch.Tensor):
                desc[name] = TensorArg(str(v.dtype).replace("torch.", ""), tuple(v.shape), id(v), tuple(v.stride()))
            elif isinstance(v, (int, float, bool)) or v is None:
                desc[name] = v
        self.launches.append(
            Launch(
                kernel=fn.fn.__name__,
                fn=fn,
                signature=signature,
                constexprs=constexprs,
                attrs=attrs,
                options={k: v for k, v in opts.__dict__.items() if isinstance(v, (int, float, bool, str))},
                grid=grid,
                autotuned=autotuned,
                call=call,
                args=desc,
            )
        )


def _jit_run(self, *args, grid, warmup=False, **kwargs):
    rec = active()
    if rec is None:
        return _orig["jit_run"](self, *args, grid=grid, warmup=warmup, **kwargs)
    tuning = getattr(_state, "in_autotune", False)
    if not tuning:
        rec.calls += 1
    rec.record(self, args, kwargs, grid, autotuned=tuning, call=rec.calls)
    return None


def _interpreted_run(self, *args, grid, warmup=False, **kwargs):
    """InterpretedFunction.run inside recording(): bound and recorded like a JITFunction of the same function."""
    rec = active()
    if rec is None:
        return _orig["interp_run"](self, *args, grid=grid, warmup=warmup, **kwargs)
    jf = getattr(self, "_osf_jit", None)
    if jf is None:
        from triton.runtime.jit import JITFunction

        jf = self._osf_jit = JITFunction(self.fn)
    return _jit_run(jf, *args, grid=grid, warmup=warmup, **kwargs)


def _autotune_run(self, *args, **kwargs):
    rec = active()
    if rec is None:
        return _orig["autotune_run"](self, *args, **kwargs)
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    rec.calls += 1
    _state.in_autotune = True
    try:
        for config in configs:  # every config the autotuner would benchmark
            self.fn.run(*args, **kwargs, **config.all_kwargs())
    finally:
        _state.in_autotune = False
        self.nargs = None
    return None


_orig: dict = {}


class _RunCustomOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Run the real implementation of this library's custom ops on ``meta`` tensors (the dispatcher would
    pick their fake implementation); every other op is left to the dispatcher."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name  # "opensora_fast::op"
        if name.startswith("opensora_fast::"):
            from torch._library.custom_ops import OPDEFS

            with torch.utils._python_dispatch._disable_current_modes():
                return OPDEFS[name]._init_fn(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            # a data-dependent branch on a meta tensor: bools read False, so "x_mask.all()" takes the
            # conditioning-frame (t0) path; any other scalar has no value to give
            if args[0].dtype == torch.bool:
                return False
            raise RuntimeError(f"recording: a {args[0].dtype} value is read from a meta tensor; pass it as a number")
        return func(*args, **kwargs)


@contextlib.contextmanager
def recording(sms: int = H200_SMS):
    """Record (never run) every Triton launch made inside; public ops take their Triton path."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if active() is not None:
        raise RuntimeError("recording() does not nest")
    try:  # under TRITON_INTERPRET=1 the @triton.jit objects are InterpretedFunction
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        InterpretedFunction = None
    if not _orig:
        _orig["jit_run"] = JITFunction.run
        _orig["autotune_run"] = Autotuner.run
        if InterpretedFunction is not None:
            _orig["interp_run"] = InterpretedFunction.run
    rec = Recorder(sms)
    JITFunction.run = _jit_run
    Autotuner.run = _autotune_run
    if InterpretedFunction is not None:
        InterpretedFunction.run = _interpreted_run
    _state.recorder = rec
    try:
        with _RunCustomOps():
            yield rec
    finally:
        _state.recorder = None
        JITFunction.run = _orig["jit_run"]
        Autotuner.run = _orig["autotune_run"]
        if InterpretedFunction is not None:
            InterpretedFunction.run = _orig["interp_run"]


def sm_count(device: torch.device) -> int | None:
    """SMs of the GPU a launch targets: the recorded target's inside :func:`recording`, the CUDA device's,
    or None (the interpreter: launch geometry for few programs)."""
    rec = active()
    if rec is not None:
        return rec.sms
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None

"""Benchmark harness shared by ``bench/bench_<k>.py`` suites and ``python -m bench.report``.

Each suite module defines ``cases(device, dtype, tiny) -> list[Case]``; a Case builds its inputs
lazily (``make()`` returns the zero-argument callable to time), so a report at real shapes only
allocates one case at a time. pytest-benchmark runs the same cases (``test_bench`` in each suite).
On a machine without CUDA everything runs at tiny shapes through the Triton interpreter, which
proves the harness works; its timings mean nothing.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass
class Case:
    op: str  # kernel family, e.g. "layernorm_modulate"
    shape: str  # readable shape, e.g. "B=2 N=65536 C=1152"
    provider: str  # "opensora_fast" | "eager" | "torch.compile" | "sdpa-flash" | "cudnn" | "apex" | ...
    mode: str  # "fwd" | "fwd+bwd"
    make: Callable[[], Callable[[], object]]  # allocates inputs, returns the function to time
    bytes: int = 0  # fewest bytes the op must move (each input read once, each output written once)
    flops: int = 0  # useful floating-point operations
    dtype: str = "bf16"
    gpu_only: bool = False  # e.g. torch.compile / vendor paths: skipped on CPU

    @property
    def id(self) -> str:
        return f"{self.op}-{self.mode}-{self.provider}-{self.shape}".replace(" ", "")


def fwd_bwd(fn: Callable[[], torch.Tensor | tuple], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A callable running fn() forward and backward with a random upstream gradient
    (grads of ``inputs`` are reset each call so the time is forward + backward only)."""
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outs]

    def run():
        for t in inputs:
            t.grad = None
        o = fn()
        o = o if isinstance(o, tuple) else (o,)
        torch.autograd.backward(o, grads)

    return run


def time_fn(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median milliseconds per call: CUDA events via triton.testing.do_bench on GPU, wall clock on CPU."""
    if HAS_CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (interpreter / first call)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compiled(fn: Callable) -> Callable:
    """torch.compile of a reference function (the 'torch.compile' provider)."""
    return torch.compile(fn, dynamic=False)


def suite_params(cases_fn):
    """pytest parametrization for a suite: cases at tiny shapes on CPU, skipping GPU-only providers."""
    import pytest

    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    device = "cuda" if HAS_CUDA else "cpu"
    cs = [c for c in cases_fn(device, dtype, tiny=not HAS_CUDA) if HAS_CUDA or not c.gpu_only]
    return pytest.mark.parametrize("case", cs, ids=[c.id for c in cs])


def settle() -> None:
    """Free the previous case's memory and restart the CUDA peak counter."""
    gc.collect()
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_case_with_benchmark(benchmark, case: Case) -> None:
    """pytest-benchmark a Case: rounds scaled by the first call's time on GPU, peak memory recorded;
    a CUDA out-of-memory becomes a skip whose reason starts with "OOM" (extra_info oom=True)."""
    import pytest

    benchmark.extra_info.update(bytes=case.bytes, flops=case.flops, provider=case.provider, mode=case.mode)
    try:
        fn = case.make()
        t0 = time.perf_counter()
        fn()  # fail loudly before timing; also sizes the number of rounds
        if HAS_CUDA:
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            rounds = max(3, min(20, int(10.0 / max(first, 1e-4))))
            torch.cuda.reset_peak_memory_stats()
            benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=rounds, warmup_rounds=1)
            benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        else:
            benchmark.pedantic(fn, rounds=1, iterations=1)
    except torch.cuda.OutOfMemoryError as exc:
        fn = None
        settle()
        benchmark.extra_info["oom"] = True
        pytest.skip(f"OOM: {str(exc).splitlines()[0][:200]}")
    finally:
        fn = None
        settle()


@contextlib.contextmanager
def backend_env(backend: str | None):
    """OPENSORA_FAST_BACKEND=backend (None: unset, dispatch by device) inside the block, restored after."""
    from opensora_fast.kernels._utils import BACKEND_ENV

    old = os.environ.get(BACKEND_ENV)
    if backend is None:
        os.environ.pop(BACKEND_ENV, None)
    else:
        os.environ[BACKEND_ENV] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = old


def provider_backend(provider: str) -> str | None:
    """The backend a model-level provider runs: opensora_fast = Triton (through the interpreter on CPU),
    anything else = the PyTorch reference path."""
    if provider == "opensora_fast":
        return None if HAS_CUDA else "triton"
    return "reference"


def with_backend(fn: Callable, backend: str | None) -> Callable:
    """Wrap fn so every call runs under backend_env(backend): providers cannot leak into each other."""

    def run(*args, **kwargs):
        with backend_env(backend):
            return fn(*args, **kwargs)

    return run


def ours(fn: Callable) -> Callable:
    """The opensora_fast provider: Triton kernels on GPU, and through the interpreter on CPU."""
    return with_backend(fn, "triton")

"""Every attention kernel launch is idempotent: the autotuner launches each config several times on the
same buffers, so a kernel that reads what it writes (the old in-place dQ of the RMSNorm path) corrupts
its result. Here every launch runs three times in the interpreter and the outputs and gradients must be
bit-identical to single launches: spatial, temporal (packed and long), cross-attention, flash_attn_func."""

from __future__ import annotations

import pytest
import torch
from opensora_fast.kernels import cross_attention, flash_attn_func, self_attention
from opensora_fast.kernels import reference as R

from tests._close import randn

REPEATS = 3


@pytest.fixture
def repeat_launches(monkeypatch):
    """A switch: when on, every Triton launch (JITFunction / InterpretedFunction.run) runs REPEATS times."""
    from triton.runtime import interpreter, jit

    state = {"on": False, "launches": 0}
    for cls in (interpreter.InterpretedFunction, jit.JITFunction):
        real = cls.run

        def run(self, *args, _real=real, **kwargs):
            n = REPEATS if state["on"] else 1
            state["launches"] += n
            for _ in range(n - 1):
                _real(self, *args, **kwargs)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return state


def _run(fn, inputs):
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    out.backward(randn(*out.shape, dtype=out.dtype, seed=99))
    return [out.detach()] + [x.grad for x in leaves if x.grad is not None]


def _cases():
    H = 2
    qkv_s = randn(2, 2 * 19, 3 * H * 72, seed=1)
    w = 1 + 0.3 * randn(72, seed=2)
    w64 = 1 + 0.3 * randn(64, seed=3)
    cs5, cs67 = R.rope_cos_sin(5, 72), R.rope_cos_sin(67, 64)
    return {
        "spatial": (lambda x, a, b: self_attention(x, a, b, num_heads=H, num_frames=2, layout="spatial"),
                    [qkv_s, w, w.flip(0)]),
        "temporal_packed": (lambda x, a, b: self_attention(x, a, b, num_heads=H, num_frames=5, layout="temporal",
                                                           rope=cs5), [randn(1, 5 * 3, 3 * H * 72, seed=4), w, w]),
        "temporal_long": (lambda x, a, b: self_attention(x, a, b, num_heads=H, num_frames=67, layout="temporal",
                                                         rope=cs67), [randn(1, 67, 3 * H * 64, seed=5), w64, w64]),
        "temporal_generic": (lambda x, a, b: self_attention(x, a, b, num_heads=H, num_frames=9, layout="temporal"),
                             [randn(1, 9 * 2, 3 * H * 40, seed=6), w[:40], w[:40]]),
        "cross": (lambda q, kv: cross_attention(q, kv, [5, 0, 18], num_heads=H),
                  [randn(3, 12, H * 72, seed=7), randn(23, 2 * H * 72, seed=8)]),
        "flash": (lambda q, k, v: flash_attn_func(q, k, v, causal=True),
                  [randn(2, 19, H, 72, seed=9), randn(2, 23, H, 72, seed=10), randn(2, 23, H, 72, seed=11)]),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_cases()))
def test_repeated_launches_give_identical_results(triton_backend, repeat_launches, name):
    fn, inputs = _cases()[name]
    once = _run(fn, inputs)
    n_once = repeat_launches["launches"]
    repeat_launches["on"] = True
    thrice = _run(fn, inputs)
    assert repeat_launches["launches"] == (1 + REPEATS) * n_once  # every launch of the second run repeated
    assert n_once >= 2
    for i, (a, b) in enumerate(zip(once, thrice)):
        assert not torch.isnan(a).any(), f"{name}: NaN in result {i}"
        assert torch.equal(a, b), f"{name}: result {i} differs after repeated launches: {(a - b).abs().max()}"

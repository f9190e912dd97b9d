"""group_norm_silu at the VAE's shapes (GroupNorm 32 + SiLU, opensora-v1.2.md §3.3; temporal and 2D) vs eager
F.group_norm + F.silu and torch.compile of the same. bytes = read x + write y + params (forward);
forward + backward adds read x, dy and write dx."""

from __future__ import annotations

import torch
from opensora_fast.kernels import group_norm_silu, reference

from bench.harness import Case, compiled, fwd_bwd, ours, run_case_with_benchmark, suite_params

# temporal VAE (5-D, channels_last_3d in the model) and the 2D VAE decoder's ResNet blocks at 720p (4-D
# micro-batches of 4 frames, contiguous NCHW in the model: diffusers' layout)
REAL_SHAPES = [
    (1, 128, 17, 90, 160),
    (1, 256, 17, 90, 160),
    (1, 512, 5, 90, 160),
    (1, 512, 5, 45, 80),
    (4, 512, 90, 160),
    (4, 512, 180, 320),
    (4, 256, 360, 640),
    (4, 128, 720, 1280),
]
TINY_SHAPES = [(1, 8, 3, 6, 10), (2, 8, 6, 10)]
GROUPS = 32
TINY_GROUPS = 4


def _eager(x, w, b, g):
    return reference.group_norm_silu_ref(x, w, b, g)


_compiled_ref = None


def _torch_compile(x, w, b, g):
    global _compiled_ref
    if _compiled_ref is None:
        _compiled_ref = compiled(reference.group_norm_silu_ref)
    return _compiled_ref(x, w, b, g)


PROVIDERS = {
    "opensora_fast": (ours(lambda x, w, b, g: group_norm_silu(x, w, b, g)), False),
    "eager": (_eager, False),
    "torch.compile": (_torch_compile, True),
}


def _maker(shape, groups, layout, provider, mode, device, dtype):
    fn, _ = PROVIDERS[provider]

    def make():
        x = torch.randn(shape, device=device, dtype=dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last_3d)
        w = torch.randn(shape[1], device=device, dtype=dtype)
        b = torch.randn(shape[1], device=device, dtype=dtype)
        if mode == "fwd":
            return lambda: fn(x, w, b, groups)
        for t in (x, w, b):
            t.requires_grad_()
        return fwd_bwd(lambda: fn(x, w, b, groups), [x, w, b])

    return make


def cases(device, dtype, tiny) -> list[Case]:
    elem = torch.finfo(dtype).bits // 8
    groups = TINY_GROUPS if tiny else GROUPS
    out = []
    for shape in TINY_SHAPES if tiny else REAL_SHAPES:
        n = 1
        for d in shape:
            n *= d
        params = 2 * shape[1] * elem
        # the model's layout first: channels_last_3d for the temporal VAE, NCHW for the 2D VAE
        for layout in ("channels_last", "contiguous") if len(shape) == 5 else ("contiguous",):
            name = f"{'x'.join(map(str, shape))} G={groups} {layout}"
            for provider, (_, gpu_only) in PROVIDERS.items():
                for mode in ("fwd", "fwd+bwd"):
                    nbytes = 2 * n * elem + params
                    if mode == "fwd+bwd":
                        nbytes += 3 * n * elem + 2 * params
                    out.append(
                        Case(
                            op="group_norm_silu",
                            shape=name,
                            provider=provider,
                            mode=mode,
                            make=_maker(shape, groups, layout, provider, mode, device, dtype),
                            bytes=nbytes,
                            flops=0,
                            dtype=str(dtype).removeprefix("torch."),
                            gpu_only=gpu_only,
                        )
                    )
    return out


@suite_params(cases)
def test_bench(benchmark, case):
    run_case_with_benchmark(benchmark, case)

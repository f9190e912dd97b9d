"""STDiT3-XL/2 end to end (issue 5): one denoising step and one training step, random weights.

Denoising step (mode "fwd"): CFG batch 2, 300-token captions with mixed valid lengths (120 and 300),
``velocity_only=True``, the text-KV cache warm (kept on for the callable's lifetime and filled by the
harness's untimed first call; both the pytest runner and ``bench.report`` make one), eval + no_grad, at
240p / 480p / 720p for 2 s (15 latent frames) and 16 s (120). Latents (T', H, W): 240p 30x53 (the
patch embedding pads W to 54), 480p 60x106, 720p 90x160.

Training step (mode "fwd+bwd"): batch 1, 4 s (30 latent frames) at 240p / 480p, gradient
checkpointing on every block, ``RFlow.training_losses`` (logit-normal t, timestep transform, class
dropout 0.1) and backward into every parameter (grads reset each call; no optimizer step).

Providers (each sets ``OPENSORA_FAST_BACKEND`` while the model is built and on every call, through
:func:`provider`, so they cannot leak into each other):

- ``opensora_fast``: the model's Triton kernels (variable unset on CUDA; forced to "triton" on CPU,
  where it runs through the interpreter).
- ``reference``: the same model and weights with ``OPENSORA_FAST_BACKEND=reference`` (eager PyTorch
  for norms, modulation, RoPE); on CUDA ``kernels.reference.attention_ref`` runs
  ``F.scaled_dot_product_attention``, so the baseline is Open-Sora's structure, eager + SDPA (flash /
  cuDNN / memory-efficient). The explicit softmax would need 200 GB for the 720p 16 s spatial scores.
- ``torch.compile``: the reference provider with every STDiT3 block compiled in place
  (``block.compile(dynamic=False)``; embedders and the final layer stay eager), GPU only.

flops: the model's matmul arithmetic (``step_flops``): 2 * tokens * in * out for every linear layer
and the patch-embedding conv, 4 * L_q * L_k * C per attention (QK^T and PV, all heads), the text
projections only when the text-KV cache is cold. Training counts forward + backward as 3x the forward
(the gradient-checkpoint recompute is overhead and not counted). Norms and elementwise ops are not
counted. Peak memory: ``make`` resets the CUDA peak after building the model, so
``torch.cuda.max_memory_allocated()`` after the timed calls is the peak of a step including the
resident weights (and, for training, gradients) and inputs; ``test_bench`` records it in
``benchmark.extra_info["peak_mem_bytes"]`` and turns a CUDA OOM into a skip whose reason starts "OOM".
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from opensora_fast.kernels._utils import BACKEND_ENV

from bench.harness import Case, backend_env, provider_backend, run_case_with_benchmark, settle, suite_params
from opensora_fast.models.stdit3 import STDiT3, STDiT3Config
from opensora_fast.rflow import RFlow

PROVIDERS = {"opensora_fast": False, "reference": False, "torch.compile": True}  # name -> gpu_only

# name -> (latent H, latent W, pixel height, pixel width)
RESOLUTIONS = {"240p": (30, 53, 240, 426), "480p": (60, 106, 480, 854), "720p": (90, 160, 720, 1280)}
# name -> (latent frames, pixel frames)
LENGTHS = {"2s": (15, 51), "4s": (30, 102), "16s": (120, 408)}
STEP_SHAPES = [(r, n) for n in ("2s", "16s") for r in ("240p", "480p", "720p")]
TRAIN_SHAPES = [("240p", "4s"), ("480p", "4s")]
TEXT_LENS = (120, 300)  # valid tokens of the CFG pair's 300-token captions

TINY_RES = {"tiny": (2, 3, 16, 24)}  # odd W: padded by the patch embedding, as 240p
TINY_LENGTHS = {"2f": (2, 5)}
TINY_TEXT_LENS = (5, 8)  # of STDiT3Config.tiny()'s 8 tokens


# ---------------------------------------------------------------------------------------------
# providers


@contextlib.contextmanager
def provider(name: str) -> Iterator[None]:
    """OPENSORA_FAST_BACKEND for ``name``,
    restored on exit."""
    if name not in PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {name!r}")
    with backend_env(provider_backend(name)):
        yield


# ---------------------------------------------------------------------------------------------
# model, inputs, arithmetic


def build_model(cfg: STDiT3Config, device, dtype, *, compile_blocks: bool = False) -> STDiT3:
    """Random-weight STDiT3 (Open-Sora's init) built on ``device`` and cast to ``dtype``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = STDiT3(cfg)
    model = model.to(dtype)
    if compile_blocks:
        for blk in [*model.spatial_blocks, *model.temporal_blocks]:
            blk.compile(dynamic=False)
    return model


def step_inputs(cfg: STDiT3Config, batch: int, res, length, text_lens, device, dtype) -> dict:
    """STDiT3.forward keyword arguments: latents, timesteps, captions + mask, fps, pixel sizes."""
    h, w, ph, pw = res
    t, frames = length
    g = torch.Generator().manual_seed(1)
    L = cfg.model_max_length
    lens = [text_lens[i % len(text_lens)] for i in range(batch)]
    mask = torch.tensor([[1] * n + [0] * (L - n) for n in lens], device=device)
    full = lambda v: torch.full((batch,), float(v), device=device)  # noqa: E731
    return dict(
        x=torch.randn(batch, cfg.in_channels, t, h, w, generator=g).to(device, dtype),
        timestep=full(700),
        y=torch.randn(batch, 1, L, cfg.caption_channels, generator=g).to(device, dtype),
        mask=mask,
        fps=full(24),
        height=full(ph),
        width=full(pw),
        num_frames=full(frames),
    )


def step_flops(cfg: STDiT3Config, batch: int, T: int, H: int, W: int, text_lens, *, velocity_only: bool,
               text_cached: bool) -> int:  # fmt: skip
    """Matmul flops of one STDiT3 forward on latents (batch, in, T, H, W) (see the module docstring)."""
    pt, ph, pw = cfg.patch_size
    Tp, Hp, Wp = -(-T // pt), -(-H // ph), -(-W // pw)
    S = Hp * Wp
    C = cfg.hidden_size
    hidden = int(C * cfg.mlp_ratio)
    N = batch * Tp * S  # video tokens
    lens = [text_lens[i % len(text_lens)] for i in range(batch)]
    per_block = 2 * N * (3 * C * C + C * C + C * C + C * C + 2 * C * hidden)  # qkv, proj, q, proj, mlp
    per_block += 4 * Tp * S * sum(lens) * C  # cross-attention of each sample to its own text
    spatial_attn = 4 * batch * Tp * S * S * C
    temporal_attn = 4 * batch * S * Tp * Tp * C
    total = cfg.depth * (2 * per_block + spatial_attn + temporal_attn)
    if not text_cached:
        n_txt = sum(lens)
        # y_embedder on all (padded) tokens, then kv_linear of every block on the valid ones
        total += 2 * batch * cfg.model_max_length * (cfg.caption_channels * C + C * C)
        total += cfg.depth * 2 * 2 * n_txt * C * 2 * C
    total += 2 * N * C * cfg.in_channels * pt * ph * pw  # patch embedding
    cout = cfg.in_channels if velocity_only else cfg.out_channels
    total += 2 * N * C * cout * pt * ph * pw  # final linear
    total += 2 * batch * (2 * (256 * C + C * C) + C * 6 * C)  # t and fps embedders, t_block
    return int(total)


def _step_maker(cfg, name, res, length, text_lens, device, dtype):
    def make():
        settle()
        with provider(name):
            model = build_model(cfg, device, dtype, compile_blocks=name == "torch.compile").eval()
            inputs = step_inputs(cfg, 2, res, length, text_lens, device, dtype)
            inputs.pop("num_frames")
            cache = model.text_kv_cache()
            cache.__enter__()  # stays on for the callable's lifetime (closed when it is collected)

            def step():
                with provider(name), torch.no_grad():
                    return model(**inputs, velocity_only=True)

            step._text_cache = cache  # keep the context (and the cached K/V) alive with the callable
        settle()
        return step

    return make


def _train_maker(cfg, name, res, length, text_lens, device, dtype):
    def make():
        settle()
        with provider(name):
            model = build_model(cfg, device, dtype, compile_blocks=name == "torch.compile").train()
            kw = step_inputs(cfg, 1, res, length, text_lens, device, dtype)
            x0 = kw.pop("x")
            kw.pop("timestep")
            params = [p for p in model.parameters() if p.requires_grad]
            rflow = RFlow(sample_method="logit-normal")

            def step():
                with provider(name):
                    for p in params:
                        p.grad = None
                    loss = rflow.training_losses(model, x0, kw)["loss"].mean()
                    loss.backward()
                    return loss

        settle()
        return step

    return make


# ---------------------------------------------------------------------------------------------
# cases


def cases(device, dtype, tiny) -> list[Case]:
    if tiny:
        step_cfg = train_cfg = STDiT3Config.tiny()
        res_table, len_table, text_lens = TINY_RES, TINY_LENGTHS, TINY_TEXT_LENS
        step_shapes = train_shapes = [("tiny", "2f")]
    else:
        step_cfg, train_cfg = STDiT3Config.xl_2(), STDiT3Config.xl_2()
        res_table, len_table, text_lens = RESOLUTIONS, LENGTHS, TEXT_LENS
        step_shapes, train_shapes = STEP_SHAPES, TRAIN_SHAPES
    train_cfg = dataclasses.replace(train_cfg, grad_checkpoint=True)
    dt = str(dtype).removeprefix("torch.")
    out = []
    for r, n in step_shapes:
        res, length = res_table[r], len_table[n]
        h, w = res[:2]
        flops = step_flops(step_cfg, 2, length[0], h, w, text_lens, velocity_only=True, text_cached=True)
        shape = f"{r} {n} B=2 {length[0]}x{h}x{w} text={'/'.join(map(str, text_lens))}"
        for name, gpu_only in PROVIDERS.items():
            make = _step_maker(step_cfg, name, res, length, text_lens, device, dtype)
            out.append(Case("stdit3", shape, name, "fwd", make, flops=flops, dtype=dt, gpu_only=gpu_only))
    for r, n in train_shapes:
        res, length = res_table[r], len_table[n]
        h, w = res[:2]
        fwd = step_flops(train_cfg, 1, length[0], h, w, text_lens[:1], velocity_only=False, text_cached=False)
        shape = f"{r} {n} B=1 {length[0]}x{h}x{w} ckpt"
        for name, gpu_only in PROVIDERS.items():
            make = _train_maker(train_cfg, name, res, length, text_lens[:1], device, dtype)
            case = Case("stdit3", shape, name, "fwd+bwd", make, flops=3 * fwd, dtype=dt, gpu_only=gpu_only)
            out.append(case)
    return out


@suite_params(cases)
def test_bench(benchmark, case):
    run_case_with_benchmark(benchmark, case)


def test_flops_match_parameter_count():
    """Linear-layer flops are 2 * (block linear weights) * tokens: the count follows the model's layers."""
    cfg = STDiT3Config.tiny(depth=2)
    model = STDiT3(cfg)
    B, T, H, W = 2, 3, 4, 6
    N = B * T * (H // 2) * (W // 2)
    blocks = [*model.spatial_blocks, *model.temporal_blocks]
    lin = sum(m.weight.numel() for b in blocks for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)
              and n != "cross_attn.kv_linear")  # fmt: skip
    full = step_flops(cfg, B, T, H, W, (0,), velocity_only=True, text_cached=True)
    S, C = (H // 2) * (W // 2), cfg.hidden_size
    attn = cfg.depth * 4 * B * T * S * C * (S + T)
    rest = 2 * N * C * cfg.in_channels * 4 * 2 + 2 * B * (512 * C + 8 * C * C)
    assert full == 2 * N * lin + attn + rest
    assert step_flops(cfg, B, T, H, W, (5,), velocity_only=True, text_cached=False) - full == (
        2 * B * cfg.model_max_length * (cfg.caption_channels * C + C * C)
        + len(blocks) * 2 * (B * 5) * C * 2 * C
        + 4 * T * S * B * 5 * C * len(blocks)
    )


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_flops_match_flop_counter(mode, monkeypatch):
    """step_flops equals torch's FlopCounterMode on the reference path (its explicit-softmax attention:
    FlopCounterMode does not count CPU SDPA): a warm cached velocity-only step, and a full-output
    forward with the text uncached (the training forward; the Case counts it x3)."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setenv(BACKEND_ENV, "reference")
    cfg = STDiT3Config.tiny(depth=2)
    res, length, lens = (4, 6, 32, 48), (3, 9), (5, 8)
    train = mode == "fwd+bwd"
    batch = 1 if train else 2
    model = build_model(cfg, "cpu", torch.float32).eval()  # eval: no class dropout
    kw = step_inputs(cfg, batch, res, length, lens[:batch], "cpu", torch.float32)
    kw.pop("num_frames")
    counter = FlopCounterMode(display=False)
    if train:
        with counter:
            model(**kw)
    else:
        with torch.no_grad(), model.text_kv_cache():
            model(**kw, velocity_only=True)  # fills the cache
            with counter:
                model(**kw, velocity_only=True)
    want = step_flops(cfg, batch, 3, 4, 6, lens[:batch], velocity_only=not train, text_cached=not train)
    assert counter.get_total_flops() == want

"""Memory plan for ``opensora-fast sample``: each stage's peak traced on the meta device (no weights, no GPU).

A ``TorchDispatchMode`` sees every tensor an op makes and a weak-reference finaliser sees it die, so the
live bytes of a stage (its activations; the weights are counted apart, at their dtype) and their peak
are exact for the ops as written, without running any. The STDiT3's fused kernels are traced through
their custom ops' fake implementations (outputs only, as the Triton kernels allocate), not through the
PyTorch reference (which materialises attention scores).

Stages: T5 encode (weights + activations), one denoising step with CFG (STDiT3 weights + the forward's
activations + the sampler's latents), VAE decode (weights + one temporal chunk's activations). The plan
picks where each model lives and which memory savers run, so that the peak fits a budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 1024**3


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode while they are alive; records the peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, list] = {}  # storage key -> [nbytes, tensors alive]

    def _release(self, key: int) -> None:
        entry = self._seen.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._seen[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            entry = self._seen.get(key)
            if entry is None:
                entry = self._seen[key] = [st.nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


@contextlib.contextmanager
def _kernel_fakes():
    """Route opensora_fast's ops to their custom ops (whose meta implementations allocate only the
    outputs, as the Triton kernels do) instead of the PyTorch reference."""
    keys = {"OPENSORA_FAST_BACKEND": "triton", "TRITON_INTERPRET": "1"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def trace_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of the tensors ``fn`` creates (on the meta device) while it runs, its result included."""
    mode = _LiveBytes()
    with torch.no_grad(), _kernel_fakes(), mode:
        out = fn()
        del out
    return mode.peak


# ---------------------------------------------------------------------------------------------
# memory savers (exact: the same outputs)


def _chunked_mlp_forward(mlp, chunks: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C_out), ``chunks`` token ranges one after the other: the (B, N, 4C)
        hidden activation exists for one range at a time."""
        n = x.shape[1]
        step = -(-n // chunks)
        out = None
        for i in range(0, n, step):
            part = mlp.fc2(mlp.act(mlp.fc1(x[:, i : i + step])))
            if out is None:
                out = part.new_empty(x.shape[0], n, part.shape[-1])
            out[:, i : i + step] = part
        return out

    return forward


def chunk_mlps(model, chunks: int) -> None:
    """Run every STDiT3 block's MLP over ``chunks`` token ranges (a per-instance forward installed from
    outside the model; parameters and state_dict unchanged). ``chunks <= 1`` restores the plain MLP."""
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
    for blk in [*model.spatial_blocks, *model.temporal_blocks]:
        mlp = blk.mlp
        if chunks == 1:
            mlp.__dict__.pop("forward", None)
        else:
            mlp.forward = _chunked_mlp_forward(mlp, chunks)


# ---------------------------------------------------------------------------------------------
# the plan

OFFLOAD = ("none", "t5", "all")  # what leaves the device once its stage is done
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


@dataclass
class Stage:
    name: str
    weights: int  # bytes of the stage's own model
    activations: int  # traced peak of the stage's tensors (inputs, activations, outputs)
    resident: int  # bytes of other models' weights still on the device
    note: str = ""

    @property
    def peak(self) -> int:
        return self.weights + self.activations + self.resident


@dataclass
class MemoryPlan:
    size: tuple[int, int, int]  # (frames, H, W)
    latent: tuple[int, int, int]
    batch: int
    offload: str
    cfg_sequential: bool
    mlp_chunks: int
    t5_dtype: str
    vae_micro_batch: int
    vae_tile: int | None
    decode_to_cpu: bool
    stages: list[Stage]

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    def flags(self) -> str:
        """The sample flags that select this plan."""
        f = [
            f"--offload {self.offload}",
            f"--mlp-chunks {self.mlp_chunks}",
            f"--vae-micro-batch {self.vae_micro_batch}",
        ]
        if self.cfg_sequential:
            f.insert(1, "--cfg-sequential")
        if self.vae_tile:
            f.append(f"--vae-tile {self.vae_tile}")
        return " ".join(f)

    def describe(self) -> str:
        T, H, W = self.size
        lines = [
            f"memory plan: {T} frames at {H}x{W} (latent {'x'.join(map(str, self.latent))}), {self.batch} prompt(s) "
            f"per forward, traced on the meta device",
            f"  {'stage':<28}{'weights':>10}{'activations':>13}{'other models':>14}{'peak':>10}",
        ]
        for s in self.stages:
            lines.append(
                f"  {s.name:<28}{s.weights / GiB:>9.2f}G{s.activations / GiB:>12.2f}G{s.resident / GiB:>13.2f}G"
                f"{s.peak / GiB:>9.2f}G" + (f"  ({s.note})" if s.note else "")
            )
        off = {
            "none": "nothing: T5, STDiT3 and VAE stay on the device",
            "t5": "T5 freed after encoding every prompt; STDiT3 and VAE stay",
            "all": "T5 freed after encoding; STDiT3 freed before decoding (latents kept)",
        }[self.offload]
        lines.append(f"  offload: {off}")
        lines.append(
            f"  savers: CFG {'halves one after the other' if self.cfg_sequential else 'batched'}, MLP over "
            f"{self.mlp_chunks} token chunk(s), T5 in {self.t5_dtype}, VAE {self.vae_micro_batch} frame(s) per 2D "
            f"call{f', {self.vae_tile}-pixel tiles' if self.vae_tile else ''}, decoded video to "
            f"{'the CPU' if self.decode_to_cpu else 'the device'}"
        )
        lines.append(f"  peak: {self.peak / GiB:.2f} GiB  (flags: {self.flags()})")
        return "\n".join(lines)


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


_CACHE: dict = {}


def _cached(fn):
    """Memoise a stage trace on the repr of its arguments (configs are dataclasses, some unhashable)."""

    def wrapper(*args):
        key = (fn.__name__, repr(args))
        if key not in _CACHE:
            _CACHE[key] = fn(*args)
        return _CACHE[key]

    return wrapper


@_cached
def _t5_stage(t5_config: dict, batch: int, length: int, dtype) -> tuple[int, int]:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(**{**T5_XXL, **t5_config, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False})
    with torch.device("meta"):
        t5 = T5EncoderModel(cfg).to(dtype).eval()
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    # no attention mask: building one reads its values (no meta kernel); its (B, 1, L, L) bias is small
    act = trace_peak(lambda: t5(input_ids=ids)["last_hidden_state"])
    return _nbytes(t5), act


@_cached
def _dit_stage(model_cfg, latent, size, batch: int, dtype, cfg_sequential: bool, mlp_chunks: int):
    from opensora_fast.models.stdit3 import STDiT3

    with torch.device("meta"):
        m = STDiT3(model_cfg).to(dtype).eval()
    chunk_mlps(m, mlp_chunks)
    t, h, w = latent
    T, H, W = size
    L = model_cfg.model_max_length
    n = batch if cfg_sequential else 2 * batch

    def step():
        z = torch.empty(batch, model_cfg.in_channels, t, h, w, device="meta", dtype=dtype)  # the sampler's state
        x = torch.empty(n, model_cfg.in_channels, t, h, w, device="meta", dtype=dtype)
        y = torch.empty(n, 1, L, model_cfg.caption_channels, device="meta", dtype=dtype)
        ts = torch.empty(n, device="meta", dtype=dtype)
        fps = torch.empty(1, device="meta", dtype=dtype)
        # velocity_only selects rows with a data-dependent index (no meta kernel): the full final layer
        # (8 instead of 4 output channels) is traced, a slight over-estimate
        v = m(x, ts, y, None, None, fps, float(H), float(W))
        return z, v

    return _nbytes(m), trace_peak(step)


@_cached
def _vae_stage(vae_cfg, latent, num_frames: int, batch: int, dtype, to_cpu: bool, tile: int | None):
    """(weights, peak): the decode streams one temporal chunk at a time, so the first (full) chunk's
    traced peak plus the whole latents, plus the whole video when it is written on the device."""
    from opensora_fast.models.vae import OpenSoraVAE

    with torch.device("meta"):
        vae = OpenSoraVAE(vae_cfg).to(dtype).eval()
    t, h, w = latent
    f = vae_cfg.spatial.downsample
    t1, n1 = min(t, vae.micro_z_frame_size), min(num_frames, vae_cfg.micro_frame_size)
    out = torch.empty(batch, vae_cfg.spatial.in_channels, n1, h * f, w * f, device="meta", dtype=dtype)

    def decode_chunk():
        z = torch.empty(batch, vae_cfg.temporal.in_out_channels, t1, h, w, device="meta", dtype=dtype)
        return vae.decode(z, n1, out=out, spatial_tile=tile)

    elem = torch.empty((), dtype=dtype).element_size()
    z_all = batch * vae_cfg.temporal.in_out_channels * t * h * w * elem
    video = 0 if to_cpu else batch * vae_cfg.spatial.in_channels * num_frames * h * f * w * f * elem
    return _nbytes(vae), trace_peak(decode_chunk) + z_all + video


def _configs(model=None, vae=None, t5=None):
    """(STDiT3Config, OpenSoraVAEConfig, T5 config dict) from the weight directories' config.json where
    given and present, else the Open-Sora 1.2 release's (STDiT3-XL/2, VAE v1.2, T5-v1.1-XXL)."""
    import json

    from opensora_fast.models.stdit3 import STDiT3Config
    from opensora_fast.models.vae import OpenSoraVAEConfig

    mc = STDiT3Config.xl_2()
    if model and os.path.isfile(os.path.join(model, "config.json")):
        with open(os.path.join(model, "config.json")) as f:
            mc = STDiT3Config.from_dict(json.load(f))
    vc = (OpenSoraVAEConfig.from_json_beside(vae) if vae and os.path.exists(vae) else None) or OpenSoraVAEConfig.v1_2()
    tc = {}
    if t5 and os.path.isfile(os.path.join(t5, "config.json")):
        with open(os.path.join(t5, "config.json")) as f:
            d = json.load(f)
        tc = {k: d[k] for k in T5_XXL if k in d}
    return mc, vc, tc


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_plan(
    num_frames: int,
    size: tuple[int, int],
    *,
    model=None,
    vae=None,
    t5=None,
    batch: int = 1,
    dtype: str = "bf16",
    t5_dtype: str = "bf16",
    offload: str = "t5",
    cfg_sequential: bool = False,
    mlp_chunks: int = 1,
    vae_micro_batch: int | None = None,
    vae_tile: int | None = None,
    decode_to_cpu: bool = True,
) -> MemoryPlan:
    """Trace the three stages for this clip size and these savers (``model`` / ``vae`` / ``t5``: weight
    directories whose config.json to use, or None for the release's)."""
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    mc, vc, tc = _configs(model, vae, t5)
    if vae_micro_batch is not None:
        if vae_micro_batch < 1:
            raise ValueError(f"vae_micro_batch must be >= 1, got {vae_micro_batch}")
        vc = dataclasses.replace(vc, spatial=dataclasses.replace(vc.spatial, micro_batch_size=vae_micro_batch))
    H, W = size
    f = vc.spatial.downsample
    with torch.device("meta"):
        from opensora_fast.models.vae import OpenSoraVAE

        latent = tuple(OpenSoraVAE(vc).get_latent_size((num_frames, H, W)))
    dt = _DTYPES[dtype]
    t5_w, t5_a = _t5_stage(tc, batch, mc.model_max_length, _DTYPES[t5_dtype])
    dit_w, dit_a = _dit_stage(mc, latent, (num_frames, latent[1] * f, latent[2] * f), batch, dt, cfg_sequential,
                              mlp_chunks)  # fmt: skip
    vae_w, vae_a = _vae_stage(vc, latent, num_frames, batch, dt, decode_to_cpu, vae_tile)
    keep_t5 = offload == "none"
    stages = [
        Stage(
            "T5 encode",
            t5_w,
            t5_a,
            0 if offload != "none" else dit_w + vae_w,
            f"{batch} x {mc.model_max_length} tokens",
        ),
        Stage(
            "denoising step (CFG)",
            dit_w,
            dit_a,
            vae_w * (offload != "all") + t5_w * keep_t5,
            f"{batch if cfg_sequential else 2 * batch} sample(s) per forward",
        ),
        Stage("VAE decode", vae_w, vae_a, dit_w * (offload != "all") + t5_w * keep_t5, "one temporal chunk at a time"),
    ]
    return MemoryPlan(
        (num_frames, H, W), latent, batch, offload, cfg_sequential, mlp_chunks, t5_dtype,
        vc.spatial.micro_batch_size, vae_tile, decode_to_cpu, stages,
    )  # fmt: skip


# savers in the order a plan adds them until it fits: each costs a little time, none changes the outputs
LADDER = (
    dict(offload="t5"),
    dict(offload="all"),
    dict(offload="all", cfg_sequential=True),
    dict(offload="all", cfg_sequential=True, mlp_chunks=4),
    dict(offload="all", cfg_sequential=True, mlp_chunks=8),
    dict(offload="all", cfg_sequential=True, mlp_chunks=16, vae_micro_batch=1),
    dict(offload="all", cfg_sequential=True, mlp_chunks=16, vae_micro_batch=1, vae_tile=256),
)


def fit_plan(budget: int, num_frames: int, size: tuple[int, int], **kw) -> tuple[MemoryPlan, bool]:
    """The first plan on ``LADDER`` (with ``kw`` held fixed) whose peak is <= ``budget`` bytes, and True;
    or the last one tried and False."""
    plan = None
    for step in LADDER:
        plan = make_plan(num_frames, size, **{**step, **kw})
        if plan.peak <= budget:
            return plan, True
    return plan, False


def device_budget(device) -> tuple[int, str]:
    """(bytes available, what they are): free memory on a CUDA device, else the machine's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"free of {total / GiB:.1f} GiB on {device}"
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return avail, "available RAM"

"""Training the Open-Sora 1.2 VAE (``scripts/train_vae.py`` of the release, without LPIPS / GAN terms).

Losses, as the release's ``VAELoss`` with its (untrained) logvar at 0:

    rec(a, b)  = sum |a - b| / (B * T)          (sum over C, H, W; mean over frames)
    kl         = kl_weight * sum KL(q(z|x) || N(0, I)) / B
    stage 1:  rec(x_z, x_z_rec) + [one-frame batches] rec(x_z, z)   2D VAE frozen (identity loss pulls
              the temporal latents of an image towards its 2D latents); 20% of batches are one frame
    stage 2:  rec(x_z, x_z_rec)                                       temporal VAE only
    stage 3:  rec(x, x_rec) + kl                                      whole VAE, random clip lengths

Every step draws its randomness (mixed-length choice, posterior noise) from a generator seeded by
(seed, step), so a run resumed from a checkpoint repeats the uninterrupted run exactly. Checkpoints are
directories ``step-XXXXXXXX`` holding ``model.safetensors`` (weights) and ``train_state.pt`` (optimizer
and step, read back with ``weights_only=True``), written under a temporary name and renamed into place;
the file ``latest`` names the newest.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from opensora_fast.checkpoint import (
    has_checkpoint,
    honour_umask,
    load_safetensors_checked,
    load_torch_checked,
    recover,
    resolve_resume,
    verify_checkpoint,
    write_step_dir,
)
from opensora_fast.models.vae import (
    OpenSoraVAE,
    OpenSoraVAEConfig,
    check_state_dict,
    load_state_dict_file,
    resolve_checkpoint,
)


@dataclass(frozen=True)
class VAETrainConfig:
    """One training stage. The defaults are the release's stage 3 (``configs/vae.py`` has all three)."""

    stage: int = 3
    model: OpenSoraVAEConfig = field(default_factory=OpenSoraVAEConfig)
    freeze_spatial: bool = False
    use_real_rec_loss: bool = True  # L1 on pixels + KL
    use_z_rec_loss: bool = False  # L1 on the 2D latents (temporal VAE reconstruction)
    use_image_identity_loss: bool = False  # one-frame batches: temporal latents -> 2D latents
    mixed_strategy: str | None = "mixed_video_random"  # or "mixed_video_image" or None
    mixed_image_ratio: float = 0.0
    kl_loss_weight: float = 1e-6
    num_frames: int = 33
    image_size: tuple[int, int] = (256, 256)
    batch_size: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    grad_checkpoint: bool = True
    dtype: str = "bf16"  # autocast dtype on CUDA ("bf16", "fp16" or "fp32"); CPU runs fp32
    seed: int = 42
    steps: int = 1000
    ckpt_every: int = 1000
    init_from: str | None = None  # an OpenSoraVAE checkpoint (file or directory)
    init_spatial_from: str | None = None  # a diffusers AutoencoderKL checkpoint for the 2D VAE

    def __post_init__(self):
        if self.mixed_strategy not in (None, "mixed_video_image", "mixed_video_random"):
            raise ValueError(
                f"mixed_strategy must be None, 'mixed_video_image' or 'mixed_video_random', got {self.mixed_strategy!r}"
            )
        if not (self.use_real_rec_loss or self.use_z_rec_loss or self.use_image_identity_loss):
            raise ValueError("at least one of use_real_rec_loss, use_z_rec_loss, use_image_identity_loss is needed")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be 'bf16', 'fp16' or 'fp32', got {self.dtype!r}")


@dataclass
class TrainResult:
    model: OpenSoraVAE
    losses: list[float]  # one per step run in this call
    step: int  # steps done in total (including those before a resume)
    checkpoint: str | None  # the last checkpoint written


# ------------------------------------------------------------------ loss


def rec_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum |a - b| over (C, H, W), averaged over the B*T frames of (B, C, T, H, W) tensors."""
    return (a.float() - b.float()).abs().sum() / (a.shape[0] * a.shape[2])


def vae_loss(cfg: VAETrainConfig, model: OpenSoraVAE, x: torch.Tensor, generator=None) -> tuple[torch.Tensor, dict]:
    """The stage's loss on one batch x (B, 3, T, H, W) in [-1, 1]; returns (loss, logged parts)."""
    out = model(x, generator=generator, decode_pixels=cfg.use_real_rec_loss)
    loss = torch.zeros((), device=x.device)
    parts = {}
    if cfg.use_real_rec_loss:
        parts["rec"] = rec_loss(x, out.x_rec)
        parts["kl"] = cfg.kl_loss_weight * out.posterior.kl().sum() / x.shape[0]
        loss = loss + parts["rec"] + parts["kl"]
    if cfg.use_z_rec_loss:
        parts["z_rec"] = rec_loss(out.x_z, out.x_z_rec)
        loss = loss + parts["z_rec"]
    if cfg.use_image_identity_loss and x.shape[2] == 1:
        parts["identity"] = rec_loss(out.x_z, out.z)
        loss = loss + parts["identity"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def mixed_length(cfg: VAETrainConfig, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The release's mixed strategies: keep one frame with prob mixed_image_ratio, or a random
    prefix of 1..T frames."""
    if cfg.mixed_strategy == "mixed_video_image":
        if torch.rand((), generator=g).item() < cfg.mixed_image_ratio:
            return x[:, :, :1]
    elif cfg.mixed_strategy == "mixed_video_random":
        return x[:, :, : int(torch.randint(1, x.shape[2] + 1, (), generator=g))]
    return x


# ------------------------------------------------------------------ data


def _video(item) -> torch.Tensor:
    v = item["video"] if isinstance(item, dict) else item
    if not isinstance(v, torch.Tensor) or v.dim() not in (4, 5):
        raise ValueError(f"a batch must be a (B, 3, T, H, W) or (3, T, H, W) tensor, got {type(v).__name__}")
    return v if v.dim() == 5 else v[None]


def batches(data, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """A map-style dataset (``__len__`` + ``__getitem__``, items (3, T, H, W) or {"video": ...}) is
    shuffled per epoch with a seeded permutation and stacked into batches; anything else is iterated
    as ready batches (B, 3, T, H, W)."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (list, tuple)):
        n = len(data)
        if n < batch_size:
            raise ValueError(f"the dataset has {n} items, fewer than batch_size={batch_size}")
        epoch = 0
        while True:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            for i in range(0, n - batch_size + 1, batch_size):
                yield torch.cat([_video(data[int(j)]) for j in perm[i : i + batch_size]])
            epoch += 1
    else:
        for item in data:
            yield _video(item)


# ------------------------------------------------------------------ checkpoints


def _atomic_torch_save(obj, path: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    os.close(fd)
    torch.save(obj, tmp)
    honour_umask(tmp)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: str, model: OpenSoraVAE, optimizer: torch.optim.Optimizer, step: int) -> str:
    """Write ``ckpt_dir/step-XXXXXXXX`` atomically and point ``ckpt_dir/latest`` at it."""

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict()}, os.path.join(tmp, "train_state.pt"))

    return write_step_dir(ckpt_dir, step, write)


def load_checkpoint(path: str, model: OpenSoraVAE, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights and optimizer from a checkpoint directory (or the newest complete one in a
    ``ckpt_dir``), its checksums verified; returns its step."""
    path = resolve_resume(path)
    verify_checkpoint(path)
    state = load_safetensors_checked(os.path.join(path, "model.safetensors"))
    check_state_dict(model, state)
    model.load_state_dict(state)
    train_state = load_torch_checked(os.path.join(path, "train_state.pt"))
    optimizer.load_state_dict(train_state["optimizer"])
    return int(train_state["step"])


# ------------------------------------------------------------------ the loop


def build_model(cfg: VAETrainConfig, device) -> OpenSoraVAE:
    torch.manual_seed(cfg.seed)
    if cfg.init_from is not None:
        model = OpenSoraVAE.from_pretrained(cfg.init_from, cfg.model)
    else:
        model = OpenSoraVAE(cfg.model)
    if cfg.init_spatial_from is not None:
        state = load_state_dict_file(resolve_checkpoint(cfg.init_spatial_from))
        check_state_dict(model.spatial_vae.module, state)
        model.spatial_vae.module.load_state_dict(state)
    return model.to(device=device, dtype=torch.float32)


def _step_generators(seed: int, step: int, device: torch.device):
    """(cpu generator for data choices, device generator for posterior noise), both from (seed, step)."""
    s = (seed * 1_000_003 + step) % (2**63)
    return torch.Generator().manual_seed(s), torch.Generator(device=device).manual_seed(s + 1)


def train_vae(
    cfg: VAETrainConfig,
    data: Iterable | torch.utils.data.Dataset,
    *,
    steps: int | None = None,
    model: OpenSoraVAE | None = None,
    ckpt_dir: str | None = None,
    resume: str | None = None,
    device=None,
    progress: bool = True,
    on_step: Callable[[int, float, dict], None] | None = None,
) -> TrainResult:
    """Train ``model`` (built from ``cfg`` when None) until ``steps`` (default ``cfg.steps``) steps in total.

    ``data``: a map-style dataset of clips (3, T, H, W) / {"video": ...} or an iterable of batches
    (B, 3, T, H, W) in [-1, 1]. When resuming (``resume``: a checkpoint directory or a ``ckpt_dir``
    with a ``latest`` file; ``"auto"`` = ``ckpt_dir`` if it has one), the batches already consumed are
    skipped, so a deterministic ``data`` reproduces the uninterrupted run. Checkpoints go to
    ``ckpt_dir`` every ``cfg.ckpt_every`` steps and at the end."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    total = cfg.steps if steps is None else steps
    model = build_model(cfg, device) if model is None else model.to(device)
    model.train()
    model.set_grad_checkpoint(cfg.grad_checkpoint)
    for p in model.spatial_vae.parameters():
        p.requires_grad_(not cfg.freeze_spatial)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)

    if ckpt_dir:
        for line in recover(ckpt_dir):  # what killed checkpoint writes left behind
            print(f"checkpoints: {line}")
    if resume == "auto":
        resume = ckpt_dir if ckpt_dir and has_checkpoint(ckpt_dir) else None
    start = load_checkpoint(resume, model, optimizer) if resume else 0

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.dtype]
    use_amp = device.type == "cuda" and amp_dtype is not None
    it = batches(data, cfg.batch_size, cfg.seed)
    for _ in range(start):  # batches the resumed run already consumed
        next(it)

    losses, last_ckpt = [], None
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"VAE stage {cfg.stage}", disable=not progress)
    for step in bar:
        try:
            x = next(it)
        except StopIteration:
            break
        g_cpu, g_dev = _step_generators(cfg.seed, step, device)
        x = mixed_length(cfg, x, g_cpu).to(device=device, dtype=torch.float32)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=use_amp):
            loss, parts = vae_loss(cfg, model, x, g_dev)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"VAE loss is {loss.item()} at step {step} ({parts})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4g}", frames=x.shape[2])
        if on_step is not None:
            on_step(step, losses[-1], parts)
        done = step + 1
        if ckpt_dir and (done % cfg.ckpt_every == 0 or done == total):
            last_ckpt = save_checkpoint(ckpt_dir, model, optimizer, done)
    bar.close()
    return TrainResult(model, losses, start + len(losses), last_ckpt)

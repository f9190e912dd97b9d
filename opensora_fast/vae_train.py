"""Training the Open-Sora 1.2 VAE (``scripts/train_vae.py`` of the release, without the GAN terms), through the
shared ``opensora_fast.trainer``.

Losses, as the release's ``VAELoss`` with its (untrained) logvar at 0:

    rec(a, b)  = sum |a - b| / (B * T)          (sum over C, H, W; mean over frames)
    kl         = kl_weight * sum KL(q(z|x) || N(0, I)) / B
    stage 1:  rec(x_z, x_z_rec) + [one-frame batches] rec(x_z, z)   2D VAE frozen (identity loss pulls
              the temporal latents of an image towards its 2D latents); 20% of batches are one frame
    stage 2:  rec(x_z, x_z_rec)                                       temporal VAE only
    stage 3:  rec(x, x_rec) + kl [+ 0.1 LPIPS]                        whole VAE, random clip lengths

Every step draws its randomness from (seed, step): the mixed-length choice from one generator shared by every
rank, the posterior noise of each micro-batch from its own generator (seeded by its index in the global batch),
so a run resumed from a checkpoint repeats the uninterrupted run exactly, and N processes (DDP or FSDP2) train
as one process with ``grad_accum`` N does. Checkpoints are directories ``step-XXXXXXXX`` holding
``model.safetensors`` + ``config.json`` (weights) and ``train_state.pt`` (optimizer, step, data position, read
back with ``weights_only=True``), written under a temporary name with checksums and renamed into place; the
file ``latest`` names the newest.

``micro_frame_size``: the temporal VAE encodes and decodes a clip in pieces of this many frames (the model's
config: 17 for the release, as Open-Sora 1.2 samples with); 0 gives it the whole clip in one call, as the 1.2
VAE training configs (``configs/vae/train/stage{1,2,3}.py``) do, which leave ``micro_frame_size`` unset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from opensora_fast import trainer
from opensora_fast.checkpoint import has_checkpoint, resolve_resume
from opensora_fast.common import (
    UsageError,
    apply_resume_options,
    check_device,
    option,
    options_from,
    require_path,
    tensorboard_writer,
)

if TYPE_CHECKING:  # the models import the kernels: only when a model is built (``check`` sets the backend first)
    from opensora_fast.models.vae import OpenSoraVAE, OpenSoraVAEConfig


def _vae_config() -> OpenSoraVAEConfig:
    from opensora_fast.models.vae import OpenSoraVAEConfig

    return OpenSoraVAEConfig()


@dataclass(frozen=True)
class VAETrainConfig:
    """One training stage. The defaults are the release's stage 3 (``configs/vae.py`` has all three)."""

    stage: int = 3
    model: OpenSoraVAEConfig = field(default_factory=_vae_config)
    freeze_spatial: bool = False
    use_real_rec_loss: bool = True  # L1 on pixels + KL
    use_z_rec_loss: bool = False  # L1 on the 2D latents (temporal VAE reconstruction)
    use_image_identity_loss: bool = False  # one-frame batches: temporal latents -> 2D latents
    mixed_strategy: str | None = "mixed_video_random"  # or "mixed_video_image" or None
    mixed_image_ratio: float = 0.0
    kl_loss_weight: float = 1e-6
    rec_loss: str = "l1"  # pixel loss: "l1" (the release) or "l2" (squared error: the demo's tiny VAE, see demo.py)
    # > 0: each pixel's error weighted by 1 + k * |x - background| (L1 over channels; the background is the clip's
    # per-channel median), so on a flat background the object's pixels count more; 0 (the release): unweighted
    foreground_weight: float = 0.0
    num_frames: int = 33
    image_size: tuple[int, int] = (256, 256)
    batch_size: int = 1  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (each backpropagated on its own)
    micro_frame_size: int | None = None  # frames per temporal VAE call: None the model's (17), 0 the whole clip
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    grad_checkpoint: bool = True
    dtype: str = "bf16"  # autocast dtype on CUDA ("bf16", "fp16" or "fp32"); CPU runs fp32; fp16 scales the loss
    seed: int = 42
    steps: int = 1000
    ckpt_every: int = 1000
    keep_last: int | None = None  # keep only the newest N checkpoints (None: all)
    log_every: int = 10  # a loss line every N steps
    init_from: str | None = None  # an OpenSoraVAE checkpoint (file or directory)
    init_spatial_from: str | None = None  # a diffusers AutoencoderKL checkpoint for the 2D VAE
    lpips_weight: float = 0.1  # the release's perceptual_loss_weight; used when an LPIPS module is given

    def __post_init__(self):
        if self.mixed_strategy not in (None, "mixed_video_image", "mixed_video_random"):
            raise ValueError(
                f"mixed_strategy must be None, 'mixed_video_image' or 'mixed_video_random', got {self.mixed_strategy!r}"
            )
        if not (self.use_real_rec_loss or self.use_z_rec_loss or self.use_image_identity_loss):
            raise ValueError("at least one of use_real_rec_loss, use_z_rec_loss, use_image_identity_loss is needed")
        if self.rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {self.rec_loss!r}")
        if not self.foreground_weight >= 0:
            raise ValueError(f"foreground_weight must be >= 0, got {self.foreground_weight}")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be 'bf16', 'fp16' or 'fp32', got {self.dtype!r}")
        for name in ("batch_size", "grad_accum", "steps", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_frame_size is not None and self.micro_frame_size < 0:
            raise ValueError(f"micro_frame_size must be >= 0 (0: the whole clip), got {self.micro_frame_size}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")


TrainResult = trainer.TrainResult  # losses, step, checkpoint, model (ema None)

LOSS_PARTS = ("rec", "lpips", "kl", "z_rec", "identity")  # what vae_loss logs

# ------------------------------------------------------------------ loss


def rec_loss(a: torch.Tensor, b: torch.Tensor, kind: str = "l1", foreground_weight: float = 0.0) -> torch.Tensor:
    """sum |a - b| (``kind`` "l1") or sum (a - b)^2 ("l2") over (C, H, W), averaged over the B*T frames of
    (B, C, T, H, W) tensors, ``a`` the target. ``foreground_weight`` k > 0: each pixel's error times
    1 + k * sum_c |a - background| (the background: each clip's per-channel median of ``a``)."""
    d = a.float() - b.float()
    err = d.abs() if kind == "l1" else d.square()
    if foreground_weight > 0:
        bg = a.float().flatten(2).median(dim=2).values[:, :, None, None, None]  # (B, C, 1, 1, 1)
        err = err * (1 + foreground_weight * (a.float() - bg).abs().sum(1, keepdim=True))
    return err.sum() / (a.shape[0] * a.shape[2])


def vae_loss(
    cfg: VAETrainConfig, model: OpenSoraVAE, x: torch.Tensor, generator=None, lpips=None
) -> tuple[torch.Tensor, dict]:
    """The stage's loss on one batch x (B, 3, T, H, W) in [-1, 1]; returns (loss, logged parts). With ``lpips``
    (an ``LPIPS``) the pixel loss gains ``cfg.lpips_weight`` x LPIPS per frame, added to every pixel's |error| as
    the release's VAELoss does (so it counts C*H*W times per frame)."""
    out = model(x, generator=generator, decode_pixels=cfg.use_real_rec_loss)
    loss = torch.zeros((), device=x.device)
    parts = {}
    if cfg.use_real_rec_loss:
        parts["rec"] = rec_loss(x, out.x_rec, cfg.rec_loss, cfg.foreground_weight)
        if lpips is not None and cfg.lpips_weight > 0:
            B, C, T, H, W = x.shape
            frames = x.transpose(1, 2).reshape(B * T, C, H, W)
            rec_frames = out.x_rec.transpose(1, 2).reshape(B * T, C, H, W)
            per_frame = lpips(frames.float(), rec_frames.float())  # (B*T,)
            parts["lpips"] = cfg.lpips_weight * per_frame.sum() * (C * H * W) / (B * T)
            loss = loss + parts["lpips"]
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


# ------------------------------------------------------------------ LPIPS (perceptual loss)

# VGG16's convolution widths; "M" = 2x2 max-pool. LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # indices (in torchvision's vgg16.features numbering) of the ReLUs LPIPS reads
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's input scaling layer (inputs in [-1, 1])
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(torch.nn.Module):
    """The LPIPS distance (VGG16 variant) between image batches (N, 3, H, W) in [-1, 1] -> (N,): unit-normalised
    features of 5 VGG16 stages, squared differences weighted per channel by 1x1 linear layers, averaged over
    space and summed. Weights come only from a local file (``load_lpips``); frozen."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(torch.nn.MaxPool2d(2, 2))
            else:
                layers += [torch.nn.Conv2d(c_in, v, 3, padding=1), torch.nn.ReLU(inplace=False)]
                c_in = v
        self.features = torch.nn.Sequential(*layers)
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def _taps(self, x):
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h)
            if i == _TAPS[-1]:
                break
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = 0
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = d + lin((fa - fb).pow(2)).mean(dim=(2, 3))
        return d.flatten()


def load_lpips(path: str, device=None) -> LPIPS:
    """LPIPS from a local file (.safetensors or a torch file read with weights_only=True) holding VGG16's
    ``features.N.weight/bias`` (torchvision's vgg16 names) and LPIPS's ``lin0..lin4`` weights (``linK.weight``
    or ``linK.model.1.weight``, as the lpips package saves them). Nothing is downloaded: a missing file or key is
    a ValueError naming it."""
    if not os.path.isfile(path):
        raise ValueError(
            f"--lpips-weights {path!r} does not exist: give a local file with VGG16 features.* and LPIPS lin0..lin4 "
            "weights (opensora-fast never downloads weights)"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    m = LPIPS()
    want = {}
    for k in m.features.state_dict():
        want[f"features.{k}"] = f"features.{k}"
    for i in range(5):
        src = f"lin{i}.weight" if f"lin{i}.weight" in sd else f"lin{i}.model.1.weight"
        want[f"lins.{i}.weight"] = src
    missing = [src for src in want.values() if src not in sd]
    if missing:
        raise ValueError(f"--lpips-weights {path!r} lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    state = {dst: sd[src] for dst, src in want.items()}
    try:
        m.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"--lpips-weights {path!r}: {str(e).splitlines()[0]}") from None
    return m.to(device or "cpu").eval()


# ------------------------------------------------------------------ data


def _video(item) -> torch.Tensor:
    v = item["video"] if isinstance(item, dict) else item
    if not isinstance(v, torch.Tensor) or v.dim() not in (4, 5):
        raise ValueError(f"a batch must be a (B, 3, T, H, W) or (3, T, H, W) tensor, got {type(v).__name__}")
    return v if v.dim() == 5 else v[None]


def batches(data, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """A map-style dataset (``__len__`` + ``__getitem__``, items (3, T, H, W) or {"video": ...}) is
    shuffled per epoch with a seeded permutation and cut into global batches of ``batch_size * world`` clips,
    of which process ``rank`` stacks its ``batch_size``; anything else is iterated as ready batches
    (B, 3, T, H, W) (one process only)."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (list, tuple)):
        n, size = len(data), batch_size * world
        if n < size:
            each = f" x {world} processes" if world > 1 else ""
            raise ValueError(f"the dataset has {n} items, fewer than batch_size={batch_size}{each}")
        epoch = 0
        while True:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            for i in range(0, n - size + 1, size):
                mine = perm[i + rank * batch_size : i + (rank + 1) * batch_size]
                yield torch.cat([_video(data[int(j)]) for j in mine])
            epoch += 1
    else:
        if world > 1:
            raise ValueError(
                "data: an iterable of ready batches cannot be split over processes; give a map-style dataset"
            )
        for item in data:
            yield _video(item)


# ------------------------------------------------------------------ checkpoints


def _write_vae(config: OpenSoraVAEConfig) -> Callable[[str, dict], None]:
    """Weights as ``OpenSoraVAE.save_pretrained`` writes them: ``model.safetensors`` + ``config.json``."""

    def write(directory: str, state: dict) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(directory, "model.safetensors")
        )
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1)

    return write


def save_checkpoint(ckpt_dir: str, model: OpenSoraVAE, optimizer: torch.optim.Optimizer, step: int) -> str:
    """Write ``ckpt_dir/step-XXXXXXXX`` atomically and point ``ckpt_dir/latest`` at it (one process)."""
    state = trainer.TrainState(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), None, seed=None, step=step)
    return trainer.write_checkpoint(ckpt_dir, state.state_dict(), _write_vae(model.cfg))


def load_checkpoint(path: str, model: OpenSoraVAE, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights and optimizer from a checkpoint directory (or the newest complete one in a
    ``ckpt_dir``), its checksums verified (also one written before the shared trainer, whose optimizer state is
    keyed by position); returns its step."""
    from opensora_fast.models.vae import check_state_dict

    ck = trainer.read_checkpoint(resolve_resume(path))
    check_state_dict(model, ck["model"])
    state = trainer.TrainState(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), None, seed=None)
    state.load_state_dict({**ck, "seed": None})
    return state.step


# ------------------------------------------------------------------ the loop


def build_model(cfg: VAETrainConfig, device) -> OpenSoraVAE:
    from opensora_fast.models.vae import OpenSoraVAE, check_state_dict, load_state_dict_file, resolve_checkpoint

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


def _step_seed(seed: int, step: int) -> int:
    """The seed of one step's draws (the same on every rank)."""
    return (seed * 1_000_003 + step) % (2**63)


def _micro_seed(step_seed: int, index: int) -> int:
    """The posterior-noise seed of micro-batch ``index`` of the global batch (index 0: ``step_seed + 1``)."""
    return (step_seed + 1 + index * 1_000_000_007) % (2**63)


def _step_generators(seed: int, step: int, device: torch.device):
    """(cpu generator for data choices, device generator for the posterior noise of the first micro-batch)."""
    s = _step_seed(seed, step)
    return torch.Generator().manual_seed(s), torch.Generator(device=device).manual_seed(_micro_seed(s, 0))


@contextlib.contextmanager
def micro_frames(model: OpenSoraVAE, frames: int | None):
    """Within the block ``model`` runs its temporal VAE on pieces of ``frames`` frames (None: as configured)."""
    if frames is None:
        yield
        return
    old = model.cfg
    model.cfg = dataclasses.replace(old, micro_frame_size=frames)
    try:
        yield
    finally:
        model.cfg = old


class _VAETask(trainer.Task):
    """The VAE's part of a step: a mixed-length crop of the batch (one draw per step, shared by the ranks) and the
    stage's loss per micro-batch, each with its own posterior-noise generator."""

    def __init__(self, cfg: VAETrainConfig, data, model: OpenSoraVAE, lpips, device, dp_rank: int, dp: int):
        self.cfg, self.data, self.inner, self.lpips, self.device = cfg, data, model, lpips, device
        self.dp_rank, self.dp = dp_rank, dp
        self.config = model.cfg  # the architecture saved with the weights (micro_frames changes it only in steps)

    def batches(self, start: int):
        it = batches(self.data, self.cfg.batch_size * self.cfg.grad_accum, self.cfg.seed, self.dp_rank, self.dp)
        for _ in range(start):  # batches the resumed run already consumed
            next(it)
        return it

    def step_seed(self, step: int, dp_rank: int) -> int:
        return _step_seed(self.cfg.seed, step)

    def plan(self, step: int, x: torch.Tensor, seed: int, model) -> trainer.StepPlan:
        cfg, dev = self.cfg, self.device
        x = mixed_length(cfg, x, torch.Generator().manual_seed(seed)).to(device=dev, dtype=torch.float32)
        B = x.shape[0]
        chunks = trainer.micro_batches(B, cfg.grad_accum)
        frames = None if cfg.micro_frame_size is None else (cfg.micro_frame_size or x.shape[2])

        def micro(k: int, sl: slice):
            def loss():
                g = torch.Generator(device=dev).manual_seed(_micro_seed(seed, self.dp_rank * len(chunks) + k))
                with micro_frames(self.inner, frames):
                    value, parts = vae_loss(cfg, model, x[sl], g, self.lpips)
                if len(chunks) == 1:
                    return value, parts
                w = (sl.stop - sl.start) / B
                return value * w, {n: v * w for n, v in parts.items()}

            return loss

        micros = [micro(k, sl) for k, sl in enumerate(chunks)]
        return trainer.StepPlan(micros, record={"frames": x.shape[2]}, samples=B, postfix={"frames": x.shape[2]})

    def check_model(self, model, state: dict, path: str) -> None:
        from opensora_fast.models.vae import check_state_dict

        check_state_dict(model, state)

    def write_model(self, directory: str, state: dict) -> None:
        _write_vae(self.config)(directory, state)


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
    lpips: LPIPS | None = None,
    log_path: str | None = None,
    run_meta: dict | None = None,
    parallel: str | None = None,
    fsdp_mode: str = "zero2",
) -> TrainResult:
    """Train ``model`` (built from ``cfg`` when None) until ``steps`` (default ``cfg.steps``) steps in total
    (``trainer.Trainer``).

    ``data``: a map-style dataset of clips (3, T, H, W) / {"video": ...} or an iterable of batches
    (B, 3, T, H, W) in [-1, 1]. When resuming (``resume``: a checkpoint directory or a ``ckpt_dir``
    with a ``latest`` file; ``"auto"`` = ``ckpt_dir`` if it has one), the batches already consumed are
    skipped, so a deterministic ``data`` reproduces the uninterrupted run. Checkpoints go to
    ``ckpt_dir`` every ``cfg.ckpt_every`` steps and at the end; ``log_path``: ``log.jsonl`` (and TensorBoard
    scalars beside it when installed). ``on_step(step, loss, parts)`` after each step.

    Under a process group: ``parallel`` "ddp" (the default with more than one process) or "fsdp" (FSDP2, the
    whole VAE one unit: its submodules are reached through methods, not calls); each process takes its
    ``cfg.batch_size`` clips of every global batch."""
    from opensora_fast.parallel import fsdp_mixed_precision

    dist_on = trainer.is_dist()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist_on else (0, 1)
    if parallel is None:
        parallel = "ddp" if world > 1 else "none"
    if world > 1 and parallel == "none":
        raise ValueError(f"parallel='none' with {world} processes: use 'ddp' or 'fsdp' (the gradients must be synced)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    total = cfg.steps if steps is None else steps
    model = build_model(cfg, device) if model is None else model.to(device)
    if lpips is not None:
        lpips = lpips.to(device)
    model.train()
    model.set_grad_checkpoint(cfg.grad_checkpoint)
    for p in model.spatial_vae.parameters():
        p.requires_grad_(not cfg.freeze_spatial)

    task = _VAETask(cfg, data, model, lpips, device, rank, world)
    opts = trainer.TrainerOptions(
        name=f"VAE stage {cfg.stage}", steps=total, seed=cfg.seed, lr_at=lambda step: cfg.lr, adam_eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, ema_decay=None, dtype=cfg.dtype,
        ckpt_every=cfg.ckpt_every, keep_last=cfg.keep_last, log_every=cfg.log_every, tb_prefix="vae",
    )  # fmt: skip
    mp = None
    if parallel == "fsdp" and device.type == "cuda" and cfg.dtype in ("bf16", "fp16"):
        mp = fsdp_mixed_precision(trainer.PRECISIONS[cfg.dtype])

    def step_done(step: int, rec: dict) -> None:
        if on_step is not None:
            on_step(step, rec["loss"], {k: rec[k] for k in LOSS_PARTS if k in rec})

    t = trainer.Trainer(
        opts, task, model, device=device, rank=rank, world=world, dp_rank=rank, dp=world, parallel=parallel,
        fsdp_mode=fsdp_mode, mp_policy=mp, ckpt_dir=ckpt_dir, run_meta=run_meta, log_path=log_path,
        progress=progress, on_step=step_done, tensorboard=tensorboard_writer,
    )  # fmt: skip
    return t.fit(resume)


# ------------------------------------------------------------------ ``opensora-fast train-vae``


@dataclass
class VAERunOptions:
    """The ``opensora-fast train-vae`` flags: a stage of configs/vae.py (``STAGES``) with these changes."""

    data: str | None = option(None, "CSV with 'path' and 'text' columns (the text is not used)", required=True,
                              metavar="CSV")  # fmt: skip
    stage: int = option(3, "Open-Sora 1.2 VAE stage: 1 (z-rec + image identity, 2D VAE frozen), 2 (z-rec), "
                        "3 (pixel L1 + KL [+ LPIPS], random lengths)", choices=(1, 2, 3))  # fmt: skip
    out_dir: str | None = option(None, "checkpoints (step-N/ with model.safetensors + train_state.pt), log.jsonl",
                                 required=True, metavar="DIR")  # fmt: skip
    steps: int = option(1000, "train until this step (in total)")
    resume: str | None = option(None, "a checkpoint, or (no value) the newest in --out-dir", nargs="?", const="auto")
    init_from: str | None = option(None, "start from an OpenSoraVAE checkpoint (file or directory)", metavar="PATH")
    model_config: str = option("release", "release: Open-Sora 1.2's VAE; tiny: for tests", choices=("release", "tiny"))
    num_frames: int | None = option(None, "clip length (default: the stage's, 17 or 33)", parse=int, metavar="T")
    image_size: str | None = option(None, "HxW (default: the stage's, 256x256)", metavar="HxW")
    batch_size: int | None = option(None, "clips per process and micro-batch (default: the stage's, 1)", parse=int)
    grad_accum: int = option(1, "gradient accumulation: micro-batches per optimizer step (global batch: "
                             "batch size x N x processes)", metavar="N")  # fmt: skip
    micro_frame_size: int | None = option(
        None,
        "frames per temporal-VAE call in training (default: the model's, 17 as Open-Sora 1.2 samples; 0: the "
        "whole clip in one call, as the 1.2 VAE training configs)",
        parse=int,
        metavar="N",
    )
    lr: float | None = option(None, "AdamW learning rate (default: the stage's, 1e-5)", parse=float)
    dtype: str | None = option(None, "autocast on CUDA (default: the stage's, bf16; fp16 adds loss scaling); the "
                               "CPU runs fp32", choices=("bf16", "fp16", "fp32"))  # fmt: skip
    seed: int = option(42, "data order and every random draw")
    ckpt_every: int = option(1000, "write a checkpoint every N steps (and at the end)", metavar="N")
    keep_last: int | None = option(None, "keep only the newest N checkpoints (default: keep all)", parse=int,
                                   metavar="N")  # fmt: skip
    log_every: int = option(10, "print a loss line every N steps", metavar="N")
    lpips_weights: str | None = option(None, "local VGG16 + LPIPS weights for the perceptual term (stage 3; weight "
                                       "0.1 as in Open-Sora 1.2); never downloaded", metavar="PATH")  # fmt: skip
    grad_checkpoint: bool = option(False, "gradient checkpointing (the stage configs use it on GPUs)")
    fsdp: bool = option(False, "under torchrun: FSDP2 (the VAE sharded over the processes) instead of DDP")
    fsdp_mode: str = option(
        "zero2", "with --fsdp; zero2: keep gathered weights to backward", choices=("zero2", "zero3")
    )
    dist_timeout: float = option(
        600.0, "under torchrun: a rank that waits longer than S seconds for another fails the job", metavar="S"
    )
    device: str | None = option(None, "cuda or cpu (default: cuda when every local process gets a GPU, else cpu)")
    no_progress: bool = option(False, "no progress bar")


# options that are not the run's (where it writes, how this process runs)
_NOT_RUN_OPTIONS = ("func", "resume", "out_dir", "no_progress", "device", "dist_timeout", "explicit", "argv")
# options the checkpoint's weights and loss decide
_FIXED_ON_RESUME = ("stage", "model_config", "init_from")


def _resume_options(args) -> None:
    """With ``--resume``, the options of the run being continued come from its checkpoint's ``run.json``
    (those given on this command line win, with a warning; a different stage / model is refused)."""
    if not getattr(args, "resume", None) or not getattr(args, "out_dir", None):
        return
    path = args.resume
    if path == "auto":
        ckpt_dir = os.path.join(args.out_dir, "checkpoints")
        if not has_checkpoint(ckpt_dir):
            return  # train_vae says there is nothing to resume
        path = ckpt_dir
    try:
        step_dir = resolve_resume(path)
    except (OSError, ValueError):
        return  # train_vae reports a bad --resume path
    run_file = os.path.join(step_dir, "run.json")
    if os.path.isfile(run_file):
        with open(run_file) as f:
            run = json.load(f)
        apply_resume_options(args, run, step_dir, skip=_NOT_RUN_OPTIONS, fixed=_FIXED_ON_RESUME)


def run_train_vae(args) -> int:
    """``opensora-fast train-vae``: one process, or several under torchrun (DDP, or FSDP2 with ``--fsdp``)."""
    from dataclasses import replace

    from opensora_fast.configs.vae import STAGES
    from opensora_fast.data import VideoTextDataset, parse_size
    from opensora_fast.parallel import init_distributed

    _resume_options(args)
    o = options_from(VAERunOptions, args)
    check_device(o.device)
    cfg = STAGES[o.stage]
    over = dict(seed=o.seed, steps=o.steps, ckpt_every=o.ckpt_every, grad_checkpoint=o.grad_checkpoint,
                grad_accum=o.grad_accum, keep_last=o.keep_last, log_every=o.log_every)  # fmt: skip
    if o.model_config == "tiny":
        from opensora_fast.models.vae import OpenSoraVAEConfig

        over["model"] = OpenSoraVAEConfig.tiny()
    for name in ("num_frames", "batch_size", "lr", "init_from", "dtype", "micro_frame_size"):
        if getattr(o, name) is not None:
            over[name] = getattr(o, name)
    try:
        if o.image_size:
            over["image_size"] = parse_size(o.image_size)
        cfg = replace(cfg, **over)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rank, world, dev = init_distributed(device=o.device, timeout=o.dist_timeout)
    if o.fsdp and not trainer.is_dist():
        raise UsageError("--fsdp needs a process group: run under torchrun (e.g. torchrun --nproc_per_node 2 ...)")
    say = print if rank == 0 else (lambda *a, **k: None)
    lpips = None
    if o.lpips_weights:
        try:
            lpips = load_lpips(o.lpips_weights, dev)
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif cfg.use_real_rec_loss:
        say(
            "LPIPS term off: no --lpips-weights given (Open-Sora 1.2 weighs it 0.1; give local VGG16 + LPIPS "
            "weights to add it)",
            file=sys.stderr,
        )
    T, (H, W) = cfg.num_frames, cfg.image_size
    dataset = VideoTextDataset(require_path(o.data, "--data", "the data CSV"), [(T, H, W)])
    for path in dataset.dropped:
        say(f"left out: {path}: shorter than {T} frames", file=sys.stderr)
    for path, line, why in dataset.bad:
        say(f"left out: {path} (line {line}): {why}", file=sys.stderr)
    if o.resume and o.resume != "auto":
        require_path(o.resume, "--resume", "a VAE checkpoint")
    ckpt_dir = os.path.join(o.out_dir, "checkpoints")
    if rank == 0:
        os.makedirs(o.out_dir, exist_ok=True)
    run_meta = {k: v for k, v in vars(args).items() if k not in ("func", "resume", "no_progress", "explicit", "argv")}
    if world > 1:
        say(f"VAE stage {cfg.stage}: world size {world} ({'FSDP2' if o.fsdp else 'DDP'}), device {dev}")
    res = train_vae(cfg, dataset, ckpt_dir=ckpt_dir, resume=o.resume, device=dev, progress=not o.no_progress,
                    lpips=lpips, log_path=os.path.join(o.out_dir, "log.jsonl"), run_meta=run_meta,
                    parallel="fsdp" if o.fsdp else None, fsdp_mode=o.fsdp_mode)  # fmt: skip
    say(f"VAE stage {cfg.stage} trained to step {res.step}; checkpoint {res.checkpoint}")
    if trainer.is_dist():
        torch.distributed.barrier()  # leave together (as train does)
        torch.distributed.destroy_process_group()
    return 0

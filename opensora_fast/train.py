"""``opensora-fast train``: STDiT3 training as Open-Sora 1.2's stage-1 recipe, on one CPU or GPU or on
several GPUs with torchrun and FSDP2.

Per step: a batch of equal-(T, H, W) clips (``data.bucket_batches``), VAE encode (posterior sample) and T5
encode (cached per caption), the rectified-flow loss with logit-normal timesteps and the timestep shift,
AdamW (eps 1e-15), linear warm-up, gradient clipping at 1.0, EMA 0.99, bf16 autocast on CUDA. Frame masks
for image/video conditioning (``opensora_fast.masks``, Open-Sora's ``mask_ratios``; stage-1 ratios by
default) mark conditioning frames: given clean, left out of the loss, t0 modulation through ``x_mask``.

Captions go through ``text.preprocess_prompt`` (Open-Sora's text_preprocessing) before T5 unless
``prompt_cleaning=False`` (``--no-prompt-cleaning``).

The loop is ``opensora_fast.trainer``'s (shared with the VAE): this module supplies the batches, the loss of a
step's micro-batches and the weight files. Every step seeds its randomness (timesteps, noise, frame masks,
caption dropout, VAE posterior noise) from (seed, step, rank) and the batch order from (seed, epoch), so a run
resumed from a checkpoint repeats the uninterrupted run exactly. A checkpoint ``step-XXXXXXXX/`` holds
``config.json`` + ``model.safetensors`` (training weights), ``ema/`` (the EMA weights in the same layout, what
``sample --model`` wants), ``train_state.pt`` (step, optimizer, scaler, data position, seed; read with
``weights_only=True``) and ``run.json``; it is written to a temporary directory with checksums and renamed into
place, and the file ``latest`` names the newest.

With ``sp_size`` > 1, groups of that many consecutive ranks share each sample, sequence-parallel
(``opensora_fast.parallel``: same data and random draws within a group, gradients summed over it); the
world size / sp_size groups are data parallel. With more than one data-parallel group (or ``fsdp=True``) the
model is sharded with ``parallel.shard`` (FSDP2: every block one unit, then the whole model; its reduce-scatter
also does the sequence-parallel gradient sum); ``fsdp_mode="zero2"`` (the default) keeps parameters gathered
between forward and backward like ZeRO-2, ``"zero3"`` reshards them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from opensora_fast import trainer
from opensora_fast.checkpoint import (
    CheckpointError,
    has_checkpoint,
    newest_checkpoint,
    recover,
    resolve_resume,
)
from opensora_fast.common import (
    UsageError,
    apply_resume_options,
    check_device,
    load_vae,
    option,
    options_from,
    require_path,
    save_stdit3,
    tensorboard_writer,
)
from opensora_fast.data import BadClipError, bucket_batches
from opensora_fast.masks import MASK_RATIOS, MaskGenerator
from opensora_fast.parallel import (  # noqa: F401  (set-up moved to parallel; names kept for callers)
    DIST_TIMEOUT_S,
    GradSync,
    all_reduce_grads,
    fsdp_mixed_precision,
    init_distributed,
    parallel_groups,
)


@dataclass
class DiTTrainConfig:
    """Open-Sora 1.2 stage-1 optimisation settings (configs/stdit3.py ``TrainConfig``) plus the run. Every field
    with help text is also an ``opensora-fast train`` flag (``common.option``): this is the one place of their
    defaults; ``--preset stage1|stage2|stage3`` (``configs.stdit3.PRESETS``) changes some of them."""

    steps: int = option(1000, "train until this step (in total)")
    batch_size: int = option(1, "per process (a bucket_config's per-bucket batch sizes take precedence)")
    lr: float = option(1e-4, "AdamW learning rate after warm-up")
    adam_eps: float = option(1e-15, "AdamW epsilon (Open-Sora 1.2: 1e-15)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float | None = option(1.0, "gradient norm clip; 0 disables")
    warmup_steps: int = option(1000, "linear learning-rate warm-up")
    ema_decay: float = option(0.99, "EMA of the weights (saved in ema/)")
    dtype: str = option("bf16", "autocast on CUDA; the CPU runs fp32", choices=("bf16", "fp16", "fp32"))
    grad_checkpoint: bool = option(False, "gradient checkpointing per block")
    seed: int = option(42, "data order and every random draw")
    log_every: int = option(10, "print a loss line every N steps")
    ckpt_every: int = option(200, "write a checkpoint every N steps (and at the end)")
    # True: FSDP2 even with one process; otherwise FSDP2 when there is more than one data-parallel group
    fsdp: bool | None = option(False, "FSDP2 even with one process (default: when WORLD_SIZE > 1)")
    fsdp_mode: str = option("zero2", "zero2: keep gathered weights to backward", choices=("zero2", "zero3"))
    sp_size: int = option(
        1,
        "sequence parallel: groups of N ranks share each sample (world size / N data-parallel groups)",
        flag="--sp",
        metavar="N",
    )
    sp_mode: str = option("dsp", "with --sp > 1", choices=("dsp", "ulysses", "fastseq"))
    cache_latents: bool = option(
        False, "encode each clip once (posterior mode) instead of sampling the VAE posterior every step"
    )
    eval_every: int = option(0, "every N steps, Open-Sora 1.2's evaluation loss on --eval-data (0: never)", metavar="N")
    grad_accum: int = option(
        1, "gradient accumulation: each optimizer step takes N batches, backpropagated one at a time", metavar="N"
    )
    peak_tflops: float | None = option(
        None,
        "the accelerator's dense bf16 peak for the MFU column (default: known for A100 / H100 / H200; else n/a)",
        parse=float,
        metavar="TFLOPS",
    )
    num_workers: int | None = option(
        None,
        "DataLoader worker processes decoding clips ahead of the step (0: in the training process; default: "
        "min(8, CPUs per local process - 1))",
        parse=int,
        metavar="N",
    )
    sample_method: str = "logit-normal"
    use_timestep_transform: bool = True
    # image/video conditioning: a stage name of opensora_fast.masks.MASK_RATIOS, "none", or kind -> probability
    mask_ratios: str | dict | None = option(
        "stage1",
        "frame masks for image/video conditioning: Open-Sora 1.2's ratios of that training stage "
        "(stage1/2: 20%% of samples, stage3: 25%%, mostly first-frame), or none",
        choices=("stage1", "stage2", "stage3", "none"),
    )
    max_bad_clips: int = option(
        100, "clips that cannot be read are skipped and logged; more than N stop training", metavar="N"
    )
    keep_last: int | None = option(
        None, "keep only the newest N checkpoints (default: keep all)", parse=int, metavar="N"
    )
    prompt_cleaning: bool = option(
        True,
        "give T5 the captions as written, not Open-Sora's text_preprocessing of them (prompt_cleaning=%(default)s "
        "without this flag; with --features it must match the extraction's setting)",
        flag="--no-prompt-cleaning",
    )
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.mask_ratios, str):
            if self.mask_ratios != "none" and self.mask_ratios not in MASK_RATIOS:
                raise ValueError(
                    f"mask_ratios must be one of {', '.join(MASK_RATIOS)}, 'none' or a dict, got {self.mask_ratios!r}"
                )
            self.mask_ratios = None if self.mask_ratios == "none" else dict(MASK_RATIOS[self.mask_ratios])
        if not self.grad_clip:  # 0 disables (the CLI's spelling)
            self.grad_clip = None
        if self.fsdp is False:  # never less than FSDP2 with several data-parallel groups (it syncs the gradients)
            self.fsdp = None
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be 'bf16', 'fp16' or 'fp32', got {self.dtype!r}")
        if self.fsdp_mode not in ("zero2", "zero3"):
            raise ValueError(f"fsdp_mode must be 'zero2' or 'zero3', got {self.fsdp_mode!r}")
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "sp_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError("warmup_steps must be >= 0 and lr > 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mask_ratios is not None:
            MaskGenerator(self.mask_ratios)  # raises ValueError naming a bad kind or ratio
        if self.sp_mode not in ("dsp", "ulysses", "fastseq"):
            raise ValueError(f"sp_mode must be 'dsp', 'ulysses' or 'fastseq', got {self.sp_mode!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.max_bad_clips < 0:
            raise ValueError(f"max_bad_clips must be >= 0, got {self.max_bad_clips}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up (Open-Sora's LinearWarmupLR): lr * (step + 1) / warmup for the first steps."""
        if self.warmup_steps == 0:
            return self.lr
        return self.lr * min(1.0, (step + 1) / self.warmup_steps)


def _parse_buckets(text: str):
    from opensora_fast.data import parse_buckets

    return parse_buckets(text)


@dataclass
class TrainRun:
    """The ``opensora-fast train`` flags that are not optimisation settings (those are ``DiTTrainConfig``'s):
    data, weights, the run directory, resume, device. Both dataclasses derive the command line."""

    data: str | None = option(None, "CSV with 'path' and 'text' columns (required unless --features)", metavar="CSV")
    features: str | None = option(
        None,
        "train from features extracted once (`opensora-fast extract`): no VAE or T5 is loaded",
        metavar="DIR",
    )
    buckets: list | None = option(
        "51x240x426",
        "frames x height x width buckets; a clip goes to the nearest aspect ratio that fits its length",
        parse=_parse_buckets,
        metavar="TxHxW[,...]",
    )
    bucket_config: str | dict | None = option(
        None,
        "Open-Sora's bucket_config (a .py stage config or a .json: resolution -> {num_frames: (keep probability, "
        "batch size)}); replaces --buckets / --batch-size",
        metavar="FILE",
    )
    frame_interval: int = option(1, "take every N-th frame of a random window (Open-Sora's frame_interval)")
    data_fps: float | None = option(None, "resample clips to this frame rate (default: as stored)", parse=float)
    eval_data: str | None = option(
        None, "with --eval-every: a CSV (clips in --buckets) or an extracted feature directory", metavar="CSV|DIR"
    )
    vae: str | None = option(None, "OpenSoraVAE weights (local; required unless --features)", metavar="DIR")
    t5: str | None = option(None, "T5 encoder directory (local; required unless --features)", metavar="DIR")
    init_from: str | None = option(None, "start from an STDiT3 directory (config.json + weights)")
    model_config: str = option(
        "xl",
        "fresh model: STDiT3-XL/2 (Open-Sora 1.2) or a small/tiny one for tests",
        choices=("xl", "small", "tiny"),
    )
    preset: str | None = option(
        None,
        "Open-Sora 1.2 training stage (configs/stdit3.py PRESETS): its mask ratios, learning-rate warm-up, "
        "gradient checkpointing and checkpoint cadence, unless given here",
        choices=("stage1", "stage2", "stage3"),
    )
    out_dir: str | None = option(None, "checkpoints, log.jsonl, config.json", required=True)
    resume: str | None = option(
        None,
        "a checkpoint, or (no value) the newest complete one in --out-dir; the run's options come from "
        "the checkpoint (flags given here override them, with a warning)",
        nargs="?",
        const="auto",
    )
    overwrite: bool = option(False, "replace the run already in --out-dir (else it is refused)")
    dist_timeout: float = option(
        600.0, "under torchrun: a rank that waits longer than S seconds for another fails the job", metavar="S"
    )
    device: str | None = option(None, "cuda or cpu (default: cuda when every local process gets a GPU, else cpu)")
    no_progress: bool = option(False, "no progress bar")


# ---------------------------------------------------------------------------------------------
# state and checkpoints: opensora_fast.trainer's (the names here are kept for callers)

TrainResult = trainer.TrainResult
_is_dist = trainer.is_dist
_full = trainer.full_tensor
model_state = trainer.model_state
optimizer_state = trainer.optimizer_state
load_optimizer_state = trainer.load_optimizer_state
init_ema = trainer.init_ema
update_ema = trainer.update_ema
ema_state = trainer.ema_state
load_ema = trainer.load_ema
_truncate_log = trainer.truncate_log
_micro_batches = trainer.micro_batches
_step_seed = trainer.step_seed


def _write_stdit3(config):
    return lambda directory, state: save_stdit3(state, config, directory)


def save_checkpoint(
    ckpt_dir: str,
    model,
    config,
    optimizer,
    ema: dict,
    step: int,
    rank: int = 0,
    run: dict | None = None,
    keep_last: int | None = None,
    extra: dict | None = None,
) -> str:
    """Write ``ckpt_dir/step-XXXXXXXX`` atomically (rank 0) with checksums, point ``latest`` at it and keep
    the newest ``keep_last``. ``run`` (the training options) goes to ``run.json``. Every rank must call this
    (gathering the shards is collective). ``extra``: {"scaler": state} of an fp16 run."""
    msd = model_state(model)
    sd = {"step": step, "model": msd, "ema": ema_state(ema, msd), "optimizer": optimizer_state(model, optimizer),
          "scaler": (extra or {}).get("scaler")}  # fmt: skip
    final = os.path.join(ckpt_dir, f"step-{step:08d}")
    if rank == 0:
        trainer.write_checkpoint(ckpt_dir, sd, _write_stdit3(config), run, keep_last)
    if _is_dist():
        dist.barrier()
    return final


def read_checkpoint(path: str) -> dict:
    """A training checkpoint directory, checksums verified: {"path", "step", "model", "ema", "train_state",
    "run" (run.json or None)} and the rest of ``trainer.read_checkpoint``'s. Missing, corrupt or unreadable files
    raise CheckpointError naming them."""
    return trainer.read_checkpoint(path, ema=True)


# ---------------------------------------------------------------------------------------------
# the loop


class TextCache:
    """T5 features per caption, computed once (the encoder is frozen) and kept on the CPU, at most ``max_items``
    captions (least recently used dropped first; 4.9 MB each for T5-XXL at 300 tokens in fp32). ``clean``: each
    caption goes through ``text.preprocess_prompt`` (Open-Sora's text_preprocessing) before T5."""

    def __init__(self, encoder, max_items: int = 1024, clean: bool = False):
        from collections import OrderedDict

        self.encoder, self.max_items = encoder, max_items
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cleaned: OrderedDict[str, str] = OrderedDict()  # caption -> its cleaned text, as bounded as the cache
        self.clean = clean

    def _clean(self, caption: str) -> str:
        from opensora_fast.text import preprocess_prompt

        if caption not in self.cleaned:
            self.cleaned[caption] = preprocess_prompt(caption)
            while len(self.cleaned) > self.max_items:
                self.cleaned.popitem(last=False)
        return self.cleaned[caption]

    def __call__(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.clean:
            captions = [self._clean(c) for c in captions]
        new = sorted({c for c in captions if c not in self.cache})
        got = {}
        if new:
            enc = self.encoder.encode(new)
            for k, c in enumerate(new):
                got[c] = (enc["y"][k].float().cpu(), enc["mask"][k].cpu())
        for c in captions:  # the order of use, for the least-recently-used eviction
            got.setdefault(c, self.cache.get(c))
            self.cache[c] = got[c]
            self.cache.move_to_end(c)
        while len(self.cache) > self.max_items:
            self.cache.popitem(last=False)
        y = torch.stack([got[c][0] for c in captions]).to(device)
        mask = torch.stack([got[c][1] for c in captions]).to(device)
        return y, mask


class TooManyBadClips(ValueError):
    """More clips failed to decode than ``max_bad_clips`` allows."""


class ClipLoader:
    """``dataset[i]`` with decode failures (BadClipError) skipped: a bad clip is reported once, remembered,
    and replaced by the next readable clip of its bucket, so every batch keeps its size and every rank its
    step. More than ``limit`` bad clips in all (those the scan left out included) raises TooManyBadClips."""

    def __init__(self, dataset, limit: int, report: Callable[[str], None]):
        self.dataset, self.limit, self.report = dataset, limit, report
        self.bad: dict[int, str] = {}
        self.scan_bad = len(getattr(dataset, "bad", ()))
        self.groups: dict[tuple, list[int]] = {}
        if hasattr(dataset, "bucket"):
            for i in range(len(dataset)):
                self.groups.setdefault(tuple(dataset.bucket(i)), []).append(i)

    @property
    def count(self) -> int:
        return self.scan_bad + len(self.bad)

    def _record(self, i: int, msg: str) -> None:
        self.bad[i] = msg
        self.report(f"skipped: {msg} ({self.count} bad clip(s), --max-bad-clips {self.limit})")
        if self.count > self.limit:
            raise TooManyBadClips(
                f"{self.count} clips could not be read, more than --max-bad-clips {self.limit}; the last: {msg}"
            )

    def batch(self, b: dict) -> tuple[list[dict], dict]:
        """(items, stacked videos) of a DataLoader batch, a clip that failed to decode replaced: by the next
        readable clip of its bucket (fixed buckets) or by another clip of the same batch (bucket_config)."""
        items = b["items"]
        if b["stacked"] is not None:
            return items, b["stacked"]
        good = [it for it in items if "bad" not in it]
        out = []
        for it in items:
            if "bad" not in it:
                out.append(it)
            elif isinstance(it["key"], int):
                j, got = self(it["key"])
                out.append({**got, "key": j})
            else:
                if it["key"][0] not in self.bad:
                    self._record(it["key"][0], it["bad"])
                if not good:
                    raise TooManyBadClips(f"every clip of a batch failed to decode; the last: {it['bad']}")
                out.append(dict(good[len(out) % len(good)]))
        out = [dict(it) for it in out]
        return out, _stack(out)

    def __call__(self, i) -> tuple[int, dict]:
        if not isinstance(i, int) and self.groups and hasattr(self.dataset, "crop_key"):
            # a fixed-bucket key (i, T, H, W, start); if clip i fails, the next readable clip of its bucket
            # (same T, H, W) with its window at frame 0
            if i[0] not in self.bad:
                try:
                    return i, self.dataset[i]
                except BadClipError as e:
                    self._record(i[0], str(e))
            j, item = self(i[0])
            return (j, *i[1:4], 0), item
        if not isinstance(i, int):  # a bucket_config key: no replacement in this path (cache_latents)
            try:
                return i, self.dataset[i]
            except BadClipError as e:
                self._record(i[0], str(e))
                raise TooManyBadClips(f"--cache-latents cannot replace a clip that failed to decode: {e}") from None
        group = self.groups[tuple(self.dataset.bucket(i))]
        k = group.index(i)
        for j in group[k:] + group[:k]:
            if j in self.bad:
                continue
            try:
                return j, self.dataset[j]
            except BadClipError as e:
                self.bad[j] = str(e)
                self.report(f"skipped: {e} ({self.count} bad clip(s), --max-bad-clips {self.limit})")
                if self.count > self.limit:
                    raise TooManyBadClips(
                        f"{self.count} clips could not be read, more than --max-bad-clips {self.limit}; the last: {e}"
                    ) from None
        raise TooManyBadClips(f"every clip of bucket {tuple(self.dataset.bucket(i))} failed to decode")


def _clip(key) -> int:
    return key if isinstance(key, int) else key[0]


def _key_shape(dataset, key) -> tuple[int, int, int]:
    return tuple(dataset.bucket(key)) if isinstance(key, int) else tuple(key[1:4])


def _batch_keys(dataset, cfg: DiTTrainConfig, dp_rank: int, dp: int, log: Callable[[str], None]):
    """Endless lists of item keys: an Open-Sora bucket_config dataset draws buckets, crops and per-bucket batch
    sizes every epoch (``data.BucketSampler``); a fixed-bucket dataset gives batches of ``cfg.batch_size``, features
    extracted from a bucket_config batches of their bucket's batch size."""
    from opensora_fast.data import BucketSampler

    if hasattr(dataset, "assigner"):
        return iter(BucketSampler(dataset, cfg.seed, dp_rank, dp, epoch_log=log, accum=cfg.grad_accum))
    return bucket_batches(dataset, cfg.batch_size * cfg.grad_accum, cfg.seed, dp_rank, dp, accum=cfg.grad_accum)


def default_num_workers() -> int:
    """min(8, CPUs per local process - 1), at least 0."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, (os.cpu_count() or 1) // max(1, local) - 1))


class _Items(torch.utils.data.Dataset):
    """``dataset[key]`` in a DataLoader worker; a clip that fails to decode comes back as {"bad": message}."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        try:
            return {**self.dataset[key], "key": key}
        except BadClipError as e:
            return {"bad": str(e), "key": key}


_STACKED = ("video", "z", "y", "ymask")  # clips, or extracted latents + T5 embeddings (features.FeatureDataset)


def _stack(items: list[dict]) -> dict:
    return {k: torch.stack([it.pop(k) for it in items]) for k in _STACKED if k in items[0]}


def _collate(items: list[dict]) -> dict:
    """Stacked tensors when every clip decoded (in the worker, so the main process only copies to the device)."""
    if any("bad" in it for it in items):
        return {"items": items, "stacked": None}
    return {"items": items, "stacked": _stack(items)}


class _Batches:
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self.it


def _loader(dataset, batches, num_workers: int | None, dev: torch.device):
    """A ``torch.utils.data.DataLoader`` over the key batches: ``num_workers`` processes decode ahead (2 batches
    each), pinned memory on CUDA."""
    n = default_num_workers() if num_workers is None else num_workers
    kw = dict(prefetch_factor=2) if n > 0 else {}
    return torch.utils.data.DataLoader(
        _Items(dataset),
        batch_sampler=_Batches(batches),
        num_workers=n,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        **kw,
    )


# dense bf16 peak TFLOP/s by GPU name (vendor data sheets; SXM parts)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_flops(dev: torch.device, override_tflops: float | None = None) -> float | None:
    """The accelerator's dense bf16 peak in FLOP/s (None on the CPU or an unknown GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v * 1e12
    return None


_FLOPS_CACHE: dict = {}


def step_flops(config, z_shape, text_len: int) -> int:
    """FLOPs of one training step (forward + backward) of the STDiT3 ``config`` on latents ``z_shape``, counted
    by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device with the reference kernels (cached)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from opensora_fast.kernels._utils import BACKEND_ENV
    from opensora_fast.models.stdit3 import STDiT3

    key = (json.dumps(asdict(config), sort_keys=True, default=str), tuple(z_shape), text_len)
    if key not in _FLOPS_CACHE:
        cfg = copy.deepcopy(config)
        cfg.grad_checkpoint = False
        old = os.environ.get(BACKEND_ENV)
        os.environ[BACKEND_ENV] = "reference"
        try:
            with torch.device("meta"):
                m = STDiT3(cfg).train()
                B, _, T, H, W = z_shape
                x = torch.empty(z_shape)
                f = torch.full((B,), float(T))
                kw = dict(y=torch.empty(B, 1, text_len, cfg.caption_channels), mask=None)  # every token counted
                with FlopCounterMode(display=False) as counter:
                    out = m(x, torch.full((B,), 500.0), height=float(H * 8), width=float(W * 8), num_frames=f,
                            fps=f * 0 + 24, **kw)  # fmt: skip
                    out.float().pow(2).mean().backward()
            _FLOPS_CACHE[key] = counter.get_total_flops()
        finally:
            if old is None:
                os.environ.pop(BACKEND_ENV, None)
            else:
                os.environ[BACKEND_ENV] = old
    return _FLOPS_CACHE[key]


def _mfu(config, z_shape, text_len: int, dp: int, dt: float, dev, override_tflops) -> float | None:
    peak = peak_flops(dev, override_tflops)
    if peak is None:
        return None
    return step_flops(config, z_shape, text_len) * dp / dt / peak


class _DiTTask(trainer.Task):
    """The STDiT3's part of a training step: batches of clips (or extracted features), VAE and T5 encoding,
    frame masks, timesteps and noise for the whole step, the rectified-flow loss per micro-batch."""

    def __init__(self, cfg: DiTTrainConfig, dataset, model, vae, text_encoder, dev, *, rank, dp_rank, dp, sp_group,
                 use_fsdp, eval_dataset):  # fmt: skip
        from opensora_fast.rflow import RFlow

        self.cfg, self.dataset, self.inner, self.vae, self.text_encoder = cfg, dataset, model, vae, text_encoder
        self.dev, self.rank, self.dp_rank, self.dp, self.sp_group = dev, rank, dp_rank, dp, sp_group
        self.use_fsdp, self.eval_dataset = use_fsdp, eval_dataset
        self.features = getattr(dataset, "features", False)  # latents + T5 embeddings extracted once: no VAE, no T5
        self.texts = TextCache(text_encoder, clean=cfg.prompt_cleaning)
        self.scheduler = RFlow(sample_method=cfg.sample_method, use_timestep_transform=cfg.use_timestep_transform)
        self.masker = MaskGenerator(cfg.mask_ratios) if cfg.mask_ratios else None
        self.amp = trainer.PRECISIONS[cfg.dtype]
        self.use_amp = dev.type == "cuda" and self.amp is not None
        self.latents: dict[int, tuple[torch.Tensor, dict]] = {}  # cache_latents: index -> (latent, item sans video)
        prefix = f"rank {rank}: " if _is_dist() else ""
        self.load = ClipLoader(dataset, cfg.max_bad_clips, lambda msg: tqdm.write(prefix + msg, file=sys.stderr))
        self.fetched = None
        self.sync = None

    def setup(self, model, params) -> None:
        self.params = params
        # sequence-parallel gradient sum: bucketed, overlapped with the backward (with FSDP2: in its reduce-scatter)
        if self.sp_group is not None and not self.use_fsdp:
            self.sync = GradSync(params, self.sp_group)

    def step_seed(self, step: int, dp_rank: int) -> int:
        return _step_seed(self.cfg.seed, step, dp_rank)  # the same draws on the ranks of an sp group

    def batches(self, start: int):
        keys = _batch_keys(self.dataset, self.cfg, self.dp_rank, self.dp,
                           lambda msg: self.rank == 0 and tqdm.write(msg))  # fmt: skip
        for _ in range(start):  # batches the resumed run already consumed
            next(keys)
        if self.cfg.cache_latents and not self.features:
            return ({"idx": idx} for idx in keys)
        self.fetched = iter(_loader(self.dataset, keys, self.cfg.num_workers, self.dev))
        return self._fetch()

    def _fetch(self):
        while True:
            items, stacked = self.load.batch(next(self.fetched))
            yield {"idx": [it["key"] for it in items], "items": items, "stacked": stacked}

    def close(self) -> None:
        self.fetched = None  # stops the DataLoader's workers

    @torch.no_grad()
    def _encode(self, video, sample, generator):
        video = video.to(self.dev, self.vae.dtype)
        with torch.autocast(self.dev.type, dtype=self.amp or torch.bfloat16, enabled=self.use_amp):
            if self.sp_group is not None and self.vae.cfg.micro_frame_size:
                # the ranks of a sequence-parallel group share each sample: they split its 17-frame VAE chunks
                # and all-gather the latents (the same latents and generator state as one vae.encode)
                from opensora_fast.parallel import parallel_encode

                z = parallel_encode(self.vae, video, self.sp_group, dst=None, sample=sample, generator=generator)
                return z.float()
            return self.vae.encode(video, sample=sample, generator=generator).float()

    def plan(self, step: int, batch: dict, seed: int, model) -> trainer.StepPlan:
        from opensora_fast.rflow import timestep_transform

        cfg, dev, scheduler = self.cfg, self.dev, self.scheduler
        idx = batch["idx"]
        torch.manual_seed(seed)  # caption dropout (CaptionEmbedder) draws from the global RNG
        g_cpu = torch.Generator().manual_seed(seed)
        g_dev = torch.Generator(device=dev).manual_seed(seed + 1)
        if self.features:
            items, z = batch["items"], batch["stacked"]["z"].to(dev)
        elif cfg.cache_latents:  # one latent per clip (with bucket_config: its first draw's crop)
            for k in idx:
                i = _clip(k)
                if i not in self.latents:
                    _, it = self.load(k)
                    meta = {k: v for k, v in it.items() if k != "video"}
                    self.latents[i] = (self._encode(it["video"][None], False, None)[0].cpu(), meta)
            items = [self.latents[_clip(k)][1] for k in idx]
            z = torch.stack([self.latents[_clip(k)][0] for k in idx]).to(dev)
        else:
            items, z = batch["items"], self._encode(batch["stacked"]["video"], True, g_dev)
        B = z.shape[0]
        T, H, W = _key_shape(self.dataset, idx[0])
        if self.features:
            y, mask = batch["stacked"]["y"].to(dev), batch["stacked"]["ymask"].to(dev)
        else:
            y, mask = self.texts([it["text"] for it in items], dev)

        hw_t = torch.tensor([[float(H), float(W), float(T)]], device=dev).expand(B, 3)
        kwargs = dict(y=y, mask=mask, height=hw_t[:, 0], width=hw_t[:, 1], num_frames=hw_t[:, 2])
        kwargs["fps"] = torch.tensor([float(it["fps"]) for it in items], device=dev)
        fmask = None
        if self.masker is not None:  # conditioning frames: clean input, out of the loss, t0 modulation
            fmask = self.masker.masks(B, z.shape[2], g_cpu).to(dev)
            kwargs["x_mask"] = fmask
        # the whole step's timesteps and noise first (as training_losses would draw them), so that N
        # accumulated batches equal one batch N times larger
        t = scheduler.sample_t(B, dev, g_cpu)
        if scheduler.use_timestep_transform:
            t = timestep_transform(
                t, kwargs["height"], kwargs["width"], kwargs["num_frames"],
                scale=scheduler.transform_scale, num_timesteps=scheduler.num_timesteps,
            )  # fmt: skip
        noise = torch.randn(z.shape, generator=g_cpu, dtype=z.dtype).to(dev)
        chunks = _micro_batches(B, cfg.grad_accum)

        def micro(sl: slice):
            def loss():
                kw = {k: v[sl] for k, v in kwargs.items()}
                out = scheduler.training_losses(
                    model, z[sl], kw, noise=noise[sl], mask=None if fmask is None else fmask[sl], t=t[sl]
                )
                part = out["loss"].mean() if len(chunks) == 1 else out["loss"].mean() * ((sl.stop - sl.start) / B)
                return part, {}

            return loss

        patch = self.inner.config.patch_size
        tokens = B * z.shape[2] * math.ceil(z.shape[3] / patch[1]) * math.ceil(z.shape[4] / patch[2]) * self.dp

        def finish(rec: dict, dt: float) -> None:
            rec["tokens_per_s"] = tokens / dt
            rec["shape"], rec["batch"] = [T, H, W], B
            rec["mfu"] = _mfu(self.inner.config, z.shape, y.shape[1], self.dp, dt, dev, cfg.peak_tflops)

        return trainer.StepPlan([micro(sl) for sl in chunks], samples=B, finish=finish)

    def before_micro(self, m: int, n: int) -> None:
        if self.sync is not None:  # one sum, in the last batch's backward
            self.sync.enabled = m == n - 1

    def after_step(self, step: int, rec: dict, model) -> None:
        cfg = self.cfg
        if self.load.count:
            rec["bad_clips"] = self.load.count
        if cfg.eval_every and self.eval_dataset is not None and (step + 1) % cfg.eval_every == 0:
            res = evaluate_loss(model, self.eval_dataset, self.vae, self.text_encoder, seed=cfg.seed,
                                batch_size=cfg.batch_size, device=self.dev,
                                prompt_cleaning=cfg.prompt_cleaning)  # fmt: skip
            rec["eval_loss"] = res["mean"]
            rec["eval"] = {k: b["mean"] for k, b in res["buckets"].items()}
            if self.rank == 0:
                tqdm.write(f"evaluation loss at step {step + 1}:\n" + format_eval(res))

    def describe(self, rec: dict) -> str:
        mfu = "n/a" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
        return f" {rec['tokens_per_s']:.0f} tokens/s MFU {mfu}"

    def check_model(self, model, state: dict, path: str) -> None:
        _check_model_state(model, state, path)

    def write_model(self, directory: str, state: dict) -> None:
        save_stdit3(state, self.inner.config, directory)

    def read_checkpoint(self, path: str) -> dict:
        return read_checkpoint(path)


def train_dit(
    cfg: DiTTrainConfig,
    dataset,
    model: torch.nn.Module,
    vae,
    text_encoder,
    *,
    ckpt_dir: str | None = None,
    resume: str | dict | None = None,
    run_meta: dict | None = None,
    log_path: str | None = None,
    device=None,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    eval_dataset=None,
) -> TrainResult:
    """Train ``model`` (an STDiT3, unwrapped, fp32) until ``cfg.steps`` steps in total (``trainer.Trainer``).

    ``dataset``: ``data.VideoTextDataset``-like (``bucket(i)``, items {"video", "text", "fps"}).
    ``vae`` (frozen OpenSoraVAE) and ``text_encoder`` (``encode(list[str])`` -> {"y", "mask"}) stay
    on ``device``. ``resume``: a checkpoint directory, a ``ckpt_dir`` (its newest complete checkpoint),
    ``"auto"`` (``ckpt_dir`` when it has one) or what ``read_checkpoint`` returned. Stale temporaries of
    killed checkpoint writes in ``ckpt_dir`` are cleaned up first (``checkpoint.recover``). ``run_meta``
    is saved with each checkpoint (``run.json``). Logs to stdout every ``cfg.log_every`` steps and every step to
    ``log_path`` (JSONL: step, loss, lr, grad_norm, samples_per_s, tokens_per_s)."""
    rank, world, dev = init_distributed() if device is None else (0, 1, torch.device(device))
    if _is_dist():
        rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, dp, _, sp_group = parallel_groups(world, cfg.sp_size, dev)
    use_fsdp = cfg.fsdp if cfg.fsdp is not None else dp > 1
    if use_fsdp and not _is_dist():
        raise RuntimeError("fsdp=True needs a process group (run under torchrun, or init one first)")
    if getattr(dataset, "features", False) and bool(getattr(dataset, "prompt_cleaning", False)) != cfg.prompt_cleaning:
        raise ValueError(
            f"prompt_cleaning={cfg.prompt_cleaning} but the features were extracted with prompt_cleaning="
            f"{bool(getattr(dataset, 'prompt_cleaning', False))}: extract them again, or train with the same setting "
            "(--no-prompt-cleaning turns it off)"
        )

    model.config.grad_checkpoint = cfg.grad_checkpoint
    model.to(dev).train()
    if sp_group is not None:
        from opensora_fast.parallel import enable_sequence_parallel

        enable_sequence_parallel(model, sp_group, mode=cfg.sp_mode)
    if not getattr(dataset, "features", False):
        vae = vae.to(dev).eval().requires_grad_(False)
    task = _DiTTask(cfg, dataset, model, vae, text_encoder, dev, rank=rank, dp_rank=dp_rank, dp=dp,
                    sp_group=sp_group, use_fsdp=use_fsdp, eval_dataset=eval_dataset)  # fmt: skip
    opts = trainer.TrainerOptions(
        name="STDiT3", steps=cfg.steps, seed=cfg.seed, lr_at=cfg.lr_at, adam_eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay, dtype=cfg.dtype,
        ckpt_every=cfg.ckpt_every, keep_last=cfg.keep_last, log_every=cfg.log_every, tb_prefix="train",
    )  # fmt: skip
    # bf16 on CUDA: FSDP2 gathers bf16 parameters and reduces bf16 gradients (fp32 master weights / Adam)
    mp = fsdp_mixed_precision(torch.bfloat16) if use_fsdp and dev.type == "cuda" and cfg.dtype == "bf16" else None
    t = trainer.Trainer(
        opts, task, model, device=dev, rank=rank, world=world, dp_rank=dp_rank, dp=dp,
        parallel="fsdp" if use_fsdp else "none", fsdp_units=[*model.spatial_blocks, *model.temporal_blocks],
        fsdp_mode=cfg.fsdp_mode, sp_size=cfg.sp_size, mp_policy=mp, ckpt_dir=ckpt_dir, run_meta=run_meta,
        log_path=log_path, progress=progress, on_step=on_step,
        ema_update=update_ema, tensorboard=tensorboard_writer,  # looked up here: tests replace them in this module
    )  # fmt: skip
    return t.fit(resume)


# ---------------------------------------------------------------------------------------------
# evaluation loss (Open-Sora 1.2's scripts/misc/eval_loss.py)


def eval_timesteps() -> list[float]:
    """Open-Sora 1.2's evaluation timesteps: ``linspace(0, 1000, 12)[1:-1]`` (10 values, no shift)."""
    return torch.linspace(0, 1000, 12)[1:-1].tolist()


@torch.no_grad()
def evaluate_loss(model, dataset, vae=None, text_encoder=None, *, seed: int = 42, batch_size: int = 4, device=None,
                  max_batches: int | None = None, prompt_cleaning: bool = True) -> dict:  # fmt: skip
    """The rectified-flow loss of ``model`` at each of Open-Sora 1.2's 10 evaluation timesteps, per bucket of
    ``dataset`` (fixed buckets or extracted features): the clips' posterior-mode latents, noise drawn from a
    generator seeded by (seed, bucket, batch) so every call sees the same noise, no frame masks, no caption
    dropout (eval mode), captions cleaned as in training (``prompt_cleaning``: ``text.preprocess_prompt`` before
    T5). Returns {"buckets": {"TxHxW": {"per_t": {t: loss}, "mean": m, "clips": n}}, "mean": m} (the average over
    buckets of their means)."""
    from opensora_fast.rflow import RFlow

    dev = torch.device(device or "cpu")
    was_training = model.training
    model.eval()
    scheduler = RFlow()
    features = getattr(dataset, "features", False)
    texts = None if features else TextCache(text_encoder, clean=prompt_cleaning)
    groups: dict[tuple, list[int]] = {}
    for i in range(len(dataset)):
        groups.setdefault(tuple(dataset.bucket(i)), []).append(i)
    ts = eval_timesteps()
    out: dict = {"buckets": {}, "timesteps": ts}
    try:
        for b_id, key in enumerate(sorted(groups)):
            T, H, W = key
            idx = groups[key]
            batches = [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)][:max_batches]
            sums = [0.0] * len(ts)
            n = 0
            for n_b, batch in enumerate(batches):
                items = [dataset[i] for i in batch]
                if features:
                    z = torch.stack([it["z"] for it in items]).to(dev)
                    y = torch.stack([it["y"] for it in items]).to(dev)
                    mask = torch.stack([it["ymask"] for it in items]).to(dev)
                else:
                    video = torch.stack([it["video"] for it in items]).to(dev, vae.dtype)
                    z = vae.encode(video, sample=False).float()
                    y, mask = texts([it["text"] for it in items], dev)
                B = z.shape[0]
                g = torch.Generator().manual_seed((seed * 1_000_003 + b_id * 7919 + n_b) % (2**63))
                noise = torch.randn(z.shape, generator=g).to(dev)
                hw = torch.tensor([float(H), float(W), float(T)], device=dev).expand(B, 3)
                kw = dict(y=y, mask=mask, height=hw[:, 0], width=hw[:, 1], num_frames=hw[:, 2])
                kw["fps"] = torch.tensor([float(it["fps"]) for it in items], device=dev)
                for k, t in enumerate(ts):
                    tt = torch.full((B,), t, device=dev)
                    loss = scheduler.training_losses(model, z, kw, noise=noise, t=tt)["loss"]
                    sums[k] += float(loss.sum())
                n += B
            per_t = {f"{t:.1f}": v / n for t, v in zip(ts, sums)}
            out["buckets"][f"{T}x{H}x{W}"] = {"per_t": per_t, "mean": sum(per_t.values()) / len(per_t), "clips": n}
    finally:
        model.train(was_training)
    out["mean"] = sum(b["mean"] for b in out["buckets"].values()) / len(out["buckets"])
    return out


def _eval_dataset(path: str, buckets, fps):
    """A feature directory (features.json) or a CSV of clips in the fixed ``buckets``."""
    from opensora_fast.data import VideoTextDataset
    from opensora_fast.features import FeatureDataset

    require_path(path, "--eval-data", "the evaluation CSV or feature directory")
    if os.path.isdir(path):
        return FeatureDataset(path)
    return VideoTextDataset(path, buckets, fps=fps)


def format_eval(res: dict) -> str:
    """The per-bucket table (rows: buckets; columns: the 10 timesteps and the mean) and the average."""
    ts = [f"{t:.1f}" for t in res["timesteps"]]
    head = f"{'bucket':>14} {'clips':>5} " + " ".join(f"{t:>7}" for t in ts) + f" {'mean':>8}"
    lines = [head]
    for name, b in res["buckets"].items():
        vals = " ".join(f"{b['per_t'][t]:7.4f}" for t in ts)
        lines.append(f"{name:>14} {b['clips']:>5} {vals} {b['mean']:8.4f}")
    lines.append(f"average over {len(res['buckets'])} bucket(s): {res['mean']:.4f}")
    return "\n".join(lines)


@dataclass
class EvalOptions:
    """The ``opensora-fast eval-loss`` flags."""

    model: str | None = option(None, "an STDiT3 directory (a checkpoint's step-N/ or step-N/ema/)", required=True,
                               metavar="DIR")  # fmt: skip
    data: str | None = option(None, "a CSV of clips (in --buckets) or an extracted feature directory", required=True,
                              metavar="CSV|DIR")  # fmt: skip
    vae: str | None = option(None, "OpenSoraVAE weights (local; not with features)", metavar="DIR")
    t5: str | None = option(None, "T5 encoder directory (local; not with features)", metavar="DIR")
    buckets: list | None = option("51x240x426", "frames x height x width buckets of the CSV's clips",
                                  parse=_parse_buckets, metavar="TxHxW[,...]")  # fmt: skip
    data_fps: float | None = option(None, "resample clips to this frame rate (default: as stored)", parse=float)
    seed: int = option(42, "noise seed (the same noise for every checkpoint evaluated with it)")
    batch_size: int = option(4, "clips per forward")
    max_batches: int | None = option(None, "at most N batches per bucket (default: all)", parse=int, metavar="N")
    device: str | None = option(None, "cuda or cpu (default: cuda when available)")
    out: str | None = option(None, "also write the table as JSON to this file", metavar="FILE")
    prompt_cleaning: bool = option(
        True,
        "give T5 the captions as written, not Open-Sora's text_preprocessing of them (as train --no-prompt-cleaning)",
        flag="--no-prompt-cleaning",
    )


def run_eval_loss(args) -> int:
    """``opensora-fast eval-loss``: Open-Sora 1.2's evaluation loss of a checkpoint, per bucket and averaged."""
    from opensora_fast.models.stdit3 import STDiT3
    from opensora_fast.text import T5TextEncoder

    o = options_from(EvalOptions, args)
    check_device(o.device)
    dev = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dataset = _eval_dataset(o.data, o.buckets, o.data_fps)
    except ValueError as e:
        raise UsageError(f"--data: {e}") from None
    model = STDiT3.from_pretrained(require_path(o.model, "--model", "the STDiT3 checkpoint")).float().to(dev)
    vae = text = None
    if not getattr(dataset, "features", False):
        vae = load_vae(require_path(o.vae, "--vae", "the VAE weights"), device=dev)
        t5 = require_path(o.t5, "--t5", "the T5 encoder directory")
        t5_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        text = T5TextEncoder(t5, model_max_length=model.config.model_max_length, device=dev, dtype=t5_dtype)
    elif o.vae or o.t5:
        raise UsageError("--data is an extracted feature directory: leave out --vae / --t5")
    res = evaluate_loss(
        model,
        dataset,
        vae,
        text,
        seed=o.seed,
        batch_size=o.batch_size,
        device=dev,
        max_batches=o.max_batches,
        prompt_cleaning=o.prompt_cleaning,
    )
    print(format_eval(res))
    if o.out:
        with open(o.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _check_model_state(model, sd: dict, path: str) -> None:
    """A checkpoint's weights that do not fit ``model``: one line (counts and a few names), not a state-dict dump."""
    from opensora_fast.checkpoint import check_state_dict, format_mismatch

    missing, unexpected, shapes = check_state_dict(model, sd)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit this STDiT3 ({model.config.hidden_size} wide, depth "
            f"{model.config.depth}): " + format_mismatch(missing, unexpected, shapes, limit=3)
        )


def _load_model_state(model, sd: dict, path: str) -> None:
    """Load a checkpoint's weights (``_check_model_state`` first)."""
    _check_model_state(model, sd, path)
    model.load_state_dict(sd)


def config_json(cfg: DiTTrainConfig) -> str:
    return json.dumps(asdict(cfg), indent=1)


def build_model(preset: str, init_from: str | None, in_channels: int, text_dim: int, text_len: int | None):
    """A fresh STDiT3 preset sized to the VAE's latent channels (and, for tiny/small, to the T5), or a
    local STDiT3 directory. XL keeps Open-Sora's 4096-dim, 300-token captions and freezes y_embedder
    (stage 1)."""
    from opensora_fast.models.stdit3 import STDiT3, STDiT3Config

    if init_from:
        model = STDiT3.from_pretrained(require_path(init_from, "--init-from", "an STDiT3 checkpoint"))
    else:
        if preset == "xl":
            config = STDiT3Config.xl_2(in_channels=in_channels, freeze_y_embedder=True)
        else:
            kw = dict(in_channels=in_channels, caption_channels=text_dim)
            if text_len:
                kw["model_max_length"] = text_len
            config = getattr(STDiT3Config, preset)(**kw)
        check_model_inputs(config, in_channels, text_dim, None)  # before building (XL: 1.1B parameters)
        model = STDiT3(config)
    check_model_inputs(model.config, in_channels, text_dim, f"--init-from {init_from!r}" if init_from else None)
    return model.float()


def check_model_inputs(c, in_channels: int, text_dim: int, source: str | None) -> None:
    """UsageError (one line, with what to change) when the STDiT3 config ``c`` does not take the VAE's latent
    channels or the T5's caption width. ``source``: where the model came from (None: a --model-config preset)."""
    src = source or "the fresh STDiT3"
    if c.in_channels != in_channels:
        raise UsageError(f"{src} takes {c.in_channels} latent channels but the VAE makes {in_channels}")
    if c.caption_channels != text_dim:
        hint = (
            "use --model-config tiny or small (sized to the given T5), or give --t5 the T5 with "
            f"d_model {c.caption_channels} (STDiT3-XL: t5-v1_1-xxl, 4096)"
            if source is None
            else f"give --t5 the T5 it was trained with (d_model {c.caption_channels})"
        )
        raise UsageError(f"{src} takes {c.caption_channels}-dim captions but the T5 encoder gives {text_dim}: {hint}")


# options of ``train`` that describe the run (saved with each checkpoint, taken from it on --resume)
_NOT_RUN_OPTIONS = ("func", "resume", "overwrite", "out_dir", "no_progress", "device", "explicit", "argv")
# options that cannot change on --resume (the weights in the checkpoint decide them)
_FIXED_ON_RESUME = ("model_config", "init_from")
# run.json keys of older checkpoints -> today's option names
_RENAMED = {"sp": "sp_size"}


def _flag(dest: str) -> str:
    return {"sp_size": "--sp"}.get(dest, "--" + dest.replace("_", "-"))


def _apply_resume_options(args, run: dict, path: str) -> None:
    """``common.apply_resume_options`` with train's option names."""
    apply_resume_options(args, run, path, skip=_NOT_RUN_OPTIONS, fixed=_FIXED_ON_RESUME, renamed=_RENAMED, flag=_flag)


def apply_preset(args, explicit: set[str]) -> None:
    """``args.preset`` (configs/stdit3.py ``PRESETS``) sets its options on ``args``, except those in ``explicit``
    (given on the command line)."""
    if not getattr(args, "preset", None):
        return
    from opensora_fast.configs.stdit3 import PRESETS

    for name, value in PRESETS[args.preset].items():
        if name == "bucket_config" and ({"buckets", "features"} & explicit):
            continue  # the user's own buckets (or extracted features) replace the stage's bucket_config
        if name not in explicit:
            setattr(args, name, value)


def _check_out_dir(args) -> str:
    """The run directory: must not be a file; a directory that already holds a run needs --resume or
    --overwrite. Checked before anything is loaded."""
    out = args.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out-dir {out!r} is a file; give a directory for the run")
    if getattr(args, "overwrite", False) and args.resume:
        raise UsageError("--resume and --overwrite exclude each other")
    held = [n for n in ("log.jsonl", "config.json", "checkpoints") if os.path.exists(os.path.join(out, n))]
    if held and not args.resume and not getattr(args, "overwrite", False):
        raise UsageError(
            f"--out-dir {out!r} already holds a run ({', '.join(held)}): add --resume to continue it or "
            "--overwrite to replace it"
        )
    return os.path.join(out, "checkpoints")


def _resume_command(args) -> str:
    import shlex

    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["opensora-fast", *argv])


class DistributedFailure(RuntimeError):
    """A collective failed or timed out: another rank died or stopped responding."""


class Heartbeat:
    """Each rank bumps a counter in torchrun's TCPStore (MASTER_ADDR:MASTER_PORT, held by the torchrun agent, so
    it outlives the ranks) every ``interval`` seconds from a daemon thread. After a failed collective,
    ``silent()`` names the ranks whose counter stopped moving (dead, stopped or hung in the interpreter)."""

    def __init__(self, rank: int, world: int, interval: float = 1.0):
        import threading
        from datetime import timedelta

        self.rank, self.world, self.interval = rank, world, interval
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="opensora-fast-heartbeat")
        self._thread.start()

    def _key(self, r: int) -> str:
        return f"opensora_fast/heartbeat/{r}"

    def _run(self) -> None:
        while True:
            try:
                self.store.add(self._key(self.rank), 1)
            except Exception:  # noqa: BLE001 (the store is gone: the job is ending)
                return
            if self._stop.wait(self.interval):
                return

    def _counts(self) -> dict[int, int]:
        return {r: self.store.add(self._key(r), 0) for r in range(self.world) if r != self.rank}

    def silent(self) -> list[int]:
        """The other ranks whose heartbeat did not move over 3 intervals (waits that long)."""
        try:
            before = self._counts()
            time.sleep(3 * self.interval)
            after = self._counts()
        except Exception:  # noqa: BLE001
            return []
        return [r for r in before if after[r] == before[r]]

    def stop(self) -> None:
        self._stop.set()


def run_train(args) -> int:
    """``opensora-fast train``: everything from local paths; writes ``out_dir/{config.json, log.jsonl,
    checkpoints/}``."""
    import shutil

    from opensora_fast.data import BucketConfigDataset, VideoTextDataset
    from opensora_fast.models.stdit3 import STDiT3, STDiT3Config
    from opensora_fast.text import T5TextEncoder

    ckpt_dir = _check_out_dir(args)
    check_device(args.device)
    rank, world, device = init_distributed(device=args.device, timeout=getattr(args, "dist_timeout", None))
    heartbeat = None
    if _is_dist() and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        try:
            heartbeat = Heartbeat(rank, world)
        except Exception as e:  # noqa: BLE001 (only a better error message is lost)
            print(f"rank {rank}: no heartbeat ({type(e).__name__}: {e})", file=sys.stderr)
    ck = None
    if args.resume:
        if rank == 0:
            for line in recover(ckpt_dir):
                print(f"checkpoints: {line}")
        if _is_dist():
            dist.barrier()
        resume = args.resume
        if resume == "auto":
            if not has_checkpoint(ckpt_dir):
                raise UsageError(f"--resume: no checkpoint in {ckpt_dir!r}")
            resume = ckpt_dir
        ck = read_checkpoint(resolve_resume(resume))
        run = ck["run"]
        if run is None and os.path.isfile(os.path.join(args.out_dir, "config.json")):  # older checkpoints
            with open(os.path.join(args.out_dir, "config.json")) as f:
                run = json.load(f).get("args")
        if run:
            if "prompt_cleaning" not in run and "prompt_cleaning" not in (getattr(args, "explicit", None) or ()):
                run = {**run, "prompt_cleaning": False}  # a run from before caption cleaning: it trained them raw
                if rank == 0:
                    print("resume: the run predates caption cleaning; it goes on with the captions as written")
            _apply_resume_options(args, run, ck["path"])
    explicit = getattr(args, "explicit", None)
    explicit = set(vars(args)) if explicit is None else set(explicit)
    if "init_from" in explicit and "model_config" in explicit and args.init_from:
        raise UsageError("--init-from and --model-config exclude each other (the weights decide the model)")
    if ck is None or not ck["run"]:  # on resume run.json holds the preset's values
        apply_preset(args, explicit)
    try:
        cfg = options_from(DiTTrainConfig, args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    feats = getattr(args, "features", None)
    data_csv = None if feats else require_path(args.data, "--data", "the data CSV")
    bucket_config = getattr(args, "bucket_config", None)
    if feats:
        from opensora_fast.features import FeatureDataset

        given = [f for f in ("data", "bucket_config", "vae", "t5") if f in explicit and getattr(args, f)]
        if given:
            raise UsageError(f"--features takes the place of {', '.join(map(_flag, given))}: leave them out")
        try:
            dataset = FeatureDataset(require_path(feats, "--features", "an extracted feature set"))
        except ValueError as e:
            raise UsageError(str(e)) from None
        left_out = []
    elif bucket_config:
        if "buckets" in explicit:
            raise UsageError("--bucket-config and --buckets exclude each other (the bucket_config names the buckets)")
        if args.data_fps is not None:
            raise UsageError("--data-fps is not used with --bucket-config (clips keep their fps / --frame-interval)")
        try:
            dataset = BucketConfigDataset(data_csv, bucket_config, getattr(args, "frame_interval", 1))
        except ValueError as e:
            raise UsageError(f"--bucket-config: {e}") from None
        left_out = dataset.left_out
    else:
        try:
            dataset = VideoTextDataset(data_csv, args.buckets, fps=args.data_fps,
                                       frame_interval=getattr(args, "frame_interval", 1))  # fmt: skip
        except ValueError as e:
            raise UsageError(f"--buckets / --frame-interval: {e}") from None
        left_out = dataset.left_out
    if rank == 0:
        for path, why in left_out:
            print(f"left out: {path}: {why}", file=sys.stderr)
        if left_out:
            print(f"{len(left_out)} clip(s) left out (listed above with the reason)")
    if rank == 0:
        for _, line, why in dataset.bad:
            print(f"skipped: {why} ({args.data} line {line})", file=sys.stderr)
    if len(dataset.bad) > cfg.max_bad_clips:
        raise UsageError(
            f"{len(dataset.bad)} clips in {args.data!r} cannot be read, more than --max-bad-clips "
            f"{cfg.max_bad_clips}; the first: {dataset.bad[0][2]} (line {dataset.bad[0][1]})"
        )
    eval_dataset = None
    if cfg.eval_every and not getattr(args, "eval_data", None):
        raise UsageError("--eval-every needs --eval-data (a CSV or an extracted feature directory)")
    if getattr(args, "eval_data", None):
        eval_dataset = _eval_dataset(args.eval_data, args.buckets, args.data_fps)
        if bool(getattr(eval_dataset, "features", False)) != bool(feats):
            raise UsageError("--eval-data must be features when training from --features, else a CSV")
    vae = text = None
    if feats:
        latent_channels, text_dim, text_len = dataset.latent_channels, dataset.text_dim, dataset.text_len
    else:
        vae = load_vae(require_path(args.vae, "--vae", "the VAE weights"), device=device)
        t5_path = require_path(args.t5, "--t5", "the T5 encoder directory")
        from transformers import AutoConfig

        latent_channels, text_len = vae.out_channels, None
        text_dim = AutoConfig.from_pretrained(t5_path, local_files_only=True).d_model
    torch.manual_seed(cfg.seed)
    if ck is not None:  # the model as the checkpoint describes it
        with open(os.path.join(ck["path"], "config.json")) as f:
            config = STDiT3Config.from_dict(json.load(f))
        check_model_inputs(config, latent_channels, text_dim, f"the checkpoint {ck['path']!r}")
        model = STDiT3(config).float()
        _load_model_state(model, ck["model"], ck["path"])
    else:
        model = build_model(args.model_config, args.init_from, latent_channels, text_dim, text_len)
    if feats and model.config.model_max_length != text_len:
        raise UsageError(
            f"--features {feats!r} holds {text_len}-token captions but the STDiT3 takes {model.config.model_max_length}"
        )
    if not feats:  # T5 in bf16 on CUDA (its weights are 17.7 GiB in fp32), fp32 on the CPU
        t5_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        text = T5TextEncoder(t5_path, model_max_length=model.config.model_max_length, device=device, dtype=t5_dtype)
    if ck is not None and ck["step"] >= cfg.steps:
        if rank == 0:
            print(
                f"checkpoint {ck['path']} is at step {ck['step']} and --steps is {cfg.steps}: nothing left to do "
                f"(raise --steps to train further)"
            )
        return 0
    run_meta = {k: v for k, v in vars(args).items() if k not in _NOT_RUN_OPTIONS}
    if rank == 0:
        if ck is None and getattr(args, "overwrite", False):  # validated: now replace the previous run
            for name in ("checkpoints", "log.jsonl", "config.json"):
                p = os.path.join(args.out_dir, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "config.json"), "w") as f:
            json.dump({"train": asdict(cfg), "args": run_meta}, f, indent=1, default=str)
        n = sum(p.numel() for p in model.parameters())
        print(
            f"STDiT3 {n / 1e6:.2f}M parameters, {len(dataset)} clips, world size {world} "
            f"(sequence parallel {cfg.sp_size}), device {device}"
        )
        if ck is not None:
            print(f"resuming from step {ck['step']} ({ck['path']})", flush=True)
    progress = {"step": ck["step"] if ck else 0}
    try:
        res = train_dit(
            cfg,
            dataset,
            model,
            vae,
            text,
            ckpt_dir=ckpt_dir,
            resume=ck,
            run_meta=run_meta,
            log_path=os.path.join(args.out_dir, "log.jsonl"),
            device=device,
            progress=not args.no_progress,
            on_step=lambda step, rec: progress.update(step=step + 1),
            eval_dataset=eval_dataset,
        )
    except KeyboardInterrupt:
        if rank == 0:
            last = newest_checkpoint(ckpt_dir)
            print(
                f"\ninterrupted after step {progress['step']}; last checkpoint: {last or 'none'}; "
                f"resume with: {_resume_command(args)}",
                file=sys.stderr,
            )
        return 130
    except TooManyBadClips:
        raise
    except (RuntimeError, dist.DistError) as e:
        if not _is_dist() or isinstance(e, FloatingPointError):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        silent = heartbeat.silent() if heartbeat is not None else []
        who = (
            f"rank(s) {', '.join(map(str, silent))} stopped responding (no heartbeat)"
            if silent
            else "another rank died or did not answer"
        )
        timeout = getattr(args, "dist_timeout", None) or DIST_TIMEOUT_S
        raise DistributedFailure(
            f"rank {rank} of {world}: a collective failed at step {progress['step'] + 1}: {who} "
            f"(--dist-timeout {timeout:g} s; {msg})"
        ) from None
    finally:
        if heartbeat is not None:
            heartbeat.stop()
    if rank == 0:
        print(
            f"trained to step {res.step}; checkpoint {res.checkpoint} "
            f"(sample with --model {os.path.join(res.checkpoint or '', 'ema')})"
        )
        print(f"log: {os.path.join(args.out_dir, 'log.jsonl')}")
    if _is_dist():
        dist.barrier()  # leave together: a rank leaving while another still talks to it can abort under gloo
        dist.destroy_process_group()
    return 0

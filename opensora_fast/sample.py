"""``opensora-fast sample``: text to video with Open-Sora 1.2's pipeline from local weights only.

T5 encodes each prompt (with Open-Sora's " aesthetic score: 6.5." suffix), the rectified-flow sampler
runs STDiT3 with batched classifier-free guidance (the learned null caption), the text K/V cache and the
velocity-only final layer, and the VAE decodes the latents to an mp4 (a png for images).

Also the loaders shared by ``train`` and ``demo``: a VAE directory holds ``model.safetensors`` and,
for non-release configurations, ``config.json`` (written by ``OpenSoraVAE.save_pretrained``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from opensora_fast.common import (  # noqa: F401
    UsageError,
    load_vae,
    option,
    require_path,
    save_stdit3,
    stdit3_config_dict,
)
from opensora_fast.data import (
    ASPECT_RATIOS,
    DURATIONS,
    IMAGE_FPS,
    RESOLUTIONS,
    image_size,
    num_frames_for,
    parse_size,
)
from opensora_fast.text import split_prompt


def check_compatible(model, vae, text_dim: int | None = None) -> None:
    c = model.config
    if c.in_channels != vae.out_channels:
        raise UsageError(f"the STDiT3 takes {c.in_channels} latent channels but the VAE makes {vae.out_channels}")
    if text_dim is not None and c.caption_channels != text_dim:
        raise UsageError(f"the STDiT3 takes {c.caption_channels}-dim captions but the T5 encoder gives {text_dim}")


# ---------------------------------------------------------------------------------------------
# sampling


MEMORY_PLAN = "memory plan (traced on the meta device; 'auto' picks the first savers that fit)"


def aes_score(text: str) -> float | None:
    """``--aes``: the aesthetic score, None (no suffix) for a negative one."""
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"invalid float value: {text!r}") from None
    return None if v < 0 else v


@dataclass
class SampleOptions:
    """What ``sample`` does; the ``opensora-fast sample`` flags and their defaults are these fields (``prompts``
    is its positional argument, with ``--prompt-file``)."""

    prompts: list[str]
    model: str | None = option(
        None, "STDiT3 weights: a directory with config.json + safetensors, local only (required)"
    )  # checked by require_path, which names what is missing (a --dry-run needs no weights)
    vae: str | None = option(None, "OpenSoraVAE weights: a file or directory, local only (required)")
    t5: str | None = option(None, "T5 encoder + tokenizer directory, local only (required)")
    resolution: str = option("240p", "Open-Sora resolution name", choices=RESOLUTIONS)
    aspect_ratio: str = option("9:16", "H:W name, as Open-Sora's", choices=ASPECT_RATIOS)
    duration: str = option("4s", "image=1, 2s=51, 4s=102, 8s=204, 16s=408 frames", choices=tuple(DURATIONS))
    num_frames: int | None = option(None, "a frame count instead of --duration", parse=int)  # overrides duration
    image_size: tuple[int, int] | None = option(  # (H, W), overrides resolution / aspect ratio
        None, "a size instead of --resolution/--aspect-ratio", parse=parse_size, metavar="HxW"
    )
    seed: int = option(42, "prompt i uses seed + i")
    steps: int = option(30, "sampling steps")
    cfg: float = option(7.0, "classifier-free guidance scale")
    fps: int = option(24, "frame rate of the written mp4 (and the model's fps input)")
    aes: float | None = option(6.5, "aesthetic score appended to prompts; < 0 disables", parse=aes_score)
    flow: float | None = option(  # Open-Sora's " motion score: X." suffix
        None, "motion score appended to prompts (Open-Sora's ' motion score: X.')", parse=float
    )
    camera_motion: str | None = option(  # Open-Sora's " camera motion: X." suffix
        None, "camera motion appended to prompts (Open-Sora's ' camera motion: X.', e.g. 'pan right', 'static')"
    )
    clean_prompts: bool = option(  # Open-Sora's text_preprocessing on every prompt (after the suffixes)
        True,
        "give T5 the prompts as written (default: Open-Sora's text_preprocessing, as in its training)",
        flag="--no-prompt-cleaning",
    )
    dtype: str = option("bf16", "on CUDA; the CPU runs fp32", choices=("bf16", "fp16", "fp32"))
    reference: str | None = option(  # image or video whose first frames every clip starts from
        None, "an image or video every clip starts from (image-to-video, video continuation)", metavar="PATH"
    )
    reference_frames: int = option(  # how many of its frames (pixel frames; an image has 1)
        1, "use the first N frames of --reference", metavar="N"
    )
    # Open-Sora's inference options
    mask_strategy: str | None = option(  # for every prompt without its own (JSON suffix)
        None,
        "Open-Sora's mask strategy for every prompt without its own: 'loop,ref,ref_start,target_start,length,"
        "edit_ratio[;...]' in latent frames (--reference 'a.mp4;b.png' gives refs 0, 1); a prompt-file line may end "
        'with {"reference_path": ..., "mask_strategy": ...}',
        metavar="S",
    )
    align: int | None = option(
        None, "round mask-strategy starts to multiples of N latent frames", parse=int, metavar="N"
    )
    batch_size: int = option(1, "clips per sampler forward (each keeps its seed)")  # and its own noise
    num_sample: int = option(1, "clips per prompt (sample k of prompt j: seed + j + k*P)")
    # the prompts [start_index:end_index] (indices and seeds stay those of the full list)
    start_index: int = option(0, "sample the prompts from this index (0-based)")
    end_index: int | None = option(None, "... up to this index (exclusive); names and seeds stay the same", parse=int)
    skip_existing: bool = option(False, "do not sample a clip whose file already exists")
    no_timestep_transform: bool = option(
        False,
        "sample at evenly spaced timesteps (Open-Sora's resolution/length shift off), for a model trained without it "
        "(the demo's: at 32x32 the shift moves training and sampling towards low noise)",
    )
    # Open-Sora's loop generation
    loop: int = option(
        1,
        "sample N clips one after the other, each conditioned on the last --condition-frame-length latent frames "
        "of the one before; the output is their concatenation (Open-Sora's loop; a prompt '|0|a cat|2|a dog' "
        "changes the text from loop 2)",
        metavar="N",
    )
    condition_frame_length: int = option(
        5, "with --loop: latent frames of the previous clip that start the next (whole VAE chunks: 5 = 17 frames)"
    )
    condition_frame_edit: float = option(
        0.0, "with --loop: edit ratio of those frames (0: kept as decoded, 1: generated freely)"
    )
    # under torchrun
    cfg_parallel: bool = option(  # with an even world: the CFG pair over 2 rank groups
        True,
        "under torchrun: sequence-parallel only (default with an even process count: the CFG pair over 2 "
        "groups of processes, each sequence-parallel)",
        flag="--no-cfg-parallel",
    )
    sp_mode: str = option(
        "dsp",
        "under torchrun: the sequence-parallel scheme (dsp: a layout switch per block; ulysses: Open-Sora's; "
        "fastseq: OpenDiT's)",
        choices=("dsp", "ulysses", "fastseq"),
    )
    device: str | None = option(None, "cuda, cuda:N or cpu (default: cuda when available)")
    out_dir: str = option("samples", "where the clips go (an existing name gets a -1, -2, ... suffix)")
    progress: bool = option(True, "no progress bars", flag="--no-progress")
    # memory plan (opensora_fast.memory): None / "auto" = the first savers that fit the device
    dry_run: bool = option(  # no weights, no device memory needed
        False, "print each stage's traced peak and the plan, then stop", group=MEMORY_PLAN
    )
    offload: str = option(
        "auto",
        "what leaves the device after its stage: none; t5 (freed after encoding); all (T5, then the STDiT3 before "
        "decoding)",
        choices=("auto", "none", "t5", "all"),
        group=MEMORY_PLAN,
    )
    cfg_sequential: bool | None = option(
        None,
        "CFG halves one after the other (half the activations; default: when the plan needs it)",
        group=MEMORY_PLAN,
        action="store_const",
        const=True,
    )
    mlp_chunks: int | None = option(
        None, "run each MLP over N token chunks (default: as the plan needs)", parse=int, group=MEMORY_PLAN
    )
    vae_micro_batch: int | None = option(
        None, "frames per 2D VAE decode call (default: 4, or as needed)", parse=int, group=MEMORY_PLAN
    )
    vae_tile: int | None = option(
        None, "decode in overlapping spatial tiles of PIXELS", parse=int, metavar="PIXELS", group=MEMORY_PLAN
    )
    t5_dtype: str = option(  # the CPU runs fp32
        "bf16", "T5 weights on a GPU (CPU: fp32)", choices=("bf16", "fp32"), group=MEMORY_PLAN
    )
    memory_budget: float | None = option(  # GiB
        None,
        "plan for this many GiB (default: the device's free memory; RAM on a CPU; a dry run without a GPU: 24)",
        parse=float,
        metavar="GIB",
        group=MEMORY_PLAN,
    )

    def __post_init__(self):
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise UsageError("give at least one non-empty prompt (positional or --prompt-file)")
        if self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        if self.fps < 1:
            raise UsageError(f"--fps must be >= 1, got {self.fps}")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise UsageError(f"--dtype must be bf16, fp16 or fp32, got {self.dtype!r}")
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise UsageError(f"--out-dir {self.out_dir!r} is a file; give a directory for the clips")
        from opensora_fast.common import check_device

        check_device(self.device)
        if self.offload not in ("auto", "none", "t5", "all"):
            raise UsageError(f"--offload must be auto, none, t5 or all, got {self.offload!r}")
        if self.t5_dtype not in ("bf16", "fp32"):
            raise UsageError(f"--t5-dtype must be bf16 or fp32, got {self.t5_dtype!r}")
        for flag, v in (("--mlp-chunks", self.mlp_chunks), ("--vae-micro-batch", self.vae_micro_batch)):
            if v is not None and v < 1:
                raise UsageError(f"{flag} must be >= 1, got {v}")
        if self.vae_tile is not None and self.vae_tile < 16:
            raise UsageError(f"--vae-tile must be >= 16 pixels, got {self.vae_tile}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_sample < 1:
            raise UsageError(f"--num-sample must be >= 1, got {self.num_sample}")
        if self.start_index < 0 or (self.end_index is not None and self.end_index < self.start_index):
            raise UsageError(f"--start-index/--end-index must satisfy 0 <= start <= end, got {self.start_index}/"
                             f"{self.end_index}")  # fmt: skip
        if self.align is not None and self.align < 1:
            raise UsageError(f"--align must be >= 1 latent frame, got {self.align}")
        parse_mask_strategy(self.mask_strategy)
        if self.loop < 1:
            raise UsageError(f"--loop must be >= 1, got {self.loop}")
        if self.condition_frame_length < 1:
            raise UsageError(f"--condition-frame-length must be >= 1 latent frame, got {self.condition_frame_length}")
        if not 0.0 <= self.condition_frame_edit <= 1.0:
            raise UsageError(f"--condition-frame-edit must be in [0, 1], got {self.condition_frame_edit}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise UsageError(f"--memory-budget must be > 0 GiB, got {self.memory_budget}")
        if self.reference is not None:
            for path in self.reference.split(";"):  # several references: "a.mp4;b.png"
                if not os.path.isfile(path):
                    raise UsageError(f"--reference {path!r} does not exist")
            if self.reference_frames < 1:
                raise UsageError(f"--reference-frames must be >= 1, got {self.reference_frames}")
        try:
            self.size()
            self.frames()
        except ValueError as e:
            raise UsageError(str(e)) from None
        if self.loop > 1 and self.frames() == 1:
            raise UsageError("--loop extends a video: use a video duration or --num-frames > 1, not an image")
        for prompt in self.prompts:
            try:
                split_prompt(split_prompt_json(prompt)[0].strip())
            except ValueError as e:
                raise UsageError(str(e)) from None

    def size(self) -> tuple[int, int]:
        return self.image_size or image_size(self.resolution, self.aspect_ratio)

    def frames(self) -> int:
        if self.num_frames is not None:
            if self.num_frames < 1:
                raise ValueError(f"--num-frames must be >= 1, got {self.num_frames}")
            return self.num_frames
        return num_frames_for(self.duration)


def conditioning_prompt(prompt: str, opts: SampleOptions) -> str:
    """The text T5 encodes, as Open-Sora 1.2's inference builds it: the score suffixes (aesthetic, motion,
    camera motion) appended, then ``text_preprocessing`` (unless ``opts.clean_prompts`` is off)."""
    from opensora_fast.text import append_score, preprocess_prompt

    p = append_score([prompt], opts.aes, opts.flow, opts.camera_motion)[0]
    return preprocess_prompt(p) if opts.clean_prompts else p


def loop_prompts(prompt: str, opts: SampleOptions) -> list[str]:
    """The text T5 encodes in each of the ``opts.loop`` loops, as Open-Sora 1.2's inference builds it: a
    multi-part prompt ``"|0|a cat|2|a dog"`` split into its parts, each part given the score suffixes and cleaned
    (``conditioning_prompt``), merged back and the part of each loop picked (``text.prompt_for_loop``)."""
    from opensora_fast.text import merge_prompt, prompt_for_loop, split_prompt

    texts, starts = split_prompt(prompt)
    merged = merge_prompt([conditioning_prompt(t, opts) for t in texts], starts)
    return [prompt_for_loop(merged, i) for i in range(opts.loop)]


def read_prompt_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"--prompt-file {path!r} does not exist")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "sample"


def free_name(base: str, ext: str) -> str:
    """``base + ext``, or ``base-1 + ext``, ``base-2 + ext``, ... the first that does not exist yet (an
    earlier sample into the same directory is never overwritten)."""
    path, n = base + ext, 0
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}{ext}"
    return path


def write_image(path: str, frame: torch.Tensor) -> str:
    """frame (3, H, W) in [-1, 1] -> png (Pillow)."""
    from PIL import Image

    arr = ((frame.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Open-Sora 1.2's per-prompt conditioning: a JSON suffix on a prompt, mask-strategy strings


def split_prompt_json(prompt: str) -> tuple[str, str | None, str | None]:
    """``'text{"reference_path": "a.mp4;b.png", "mask_strategy": "0"}'`` -> (text, reference paths or
    None, mask strategy or None), as Open-Sora's prompt files carry them (everything from the first "{")."""
    import json

    cut = prompt.find("{")
    if cut < 0:
        return prompt, None, None
    text, suffix = prompt[:cut], prompt[cut:]
    try:
        info = json.loads(suffix)
    except json.JSONDecodeError as e:
        raise UsageError(f"prompt {prompt!r}: the part from '{{' is not one JSON object ({e})") from None
    if not isinstance(info, dict) or set(info) - {"reference_path", "mask_strategy"}:
        raise UsageError(f"prompt {prompt!r}: the JSON suffix may hold only reference_path and mask_strategy")
    return text, info.get("reference_path"), info.get("mask_strategy")


@dataclass(frozen=True)
class MaskItem:
    """One ``;``-separated part of a mask strategy: in loop ``loop``, latent frames ``ref_start`` ..
    ``ref_start + length`` of reference ``ref`` condition the clip's frames from ``target_start``
    (negative starts count from the end), noised to ``edit`` (0: kept, 1: free)."""

    loop: int = 0
    ref: int = 0
    ref_start: int = 0
    target_start: int = 0
    length: int = 1
    edit: float = 0.0


def parse_mask_strategy(text: str | None) -> list[MaskItem]:
    """Open-Sora's mask strategy string, e.g. ``"0,0,0,0,1;0,1,-1,-1,1,0.5"`` (missing trailing numbers
    take the defaults 0,0,0,0,1,0)."""
    items = []
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        fields = [f.strip() for f in part.split(",")]
        if len(fields) > 6:
            raise UsageError(f"mask strategy {part!r}: at most 6 comma-separated numbers (loop,ref,ref_start,"
                             "target_start,length,edit_ratio)")  # fmt: skip
        try:
            ints = [int(f) for f in fields[:5]]
            edit = float(fields[5]) if len(fields) == 6 else 0.0
        except ValueError:
            raise UsageError(f"mask strategy {part!r}: expected integers (and a float edit ratio)") from None
        item = MaskItem(*ints, edit) if len(fields) == 6 else MaskItem(*ints)
        if item.length < 1 or item.ref < 0 or item.loop < 0 or not 0.0 <= item.edit <= 1.0:
            raise UsageError(f"mask strategy {part!r}: need loop >= 0, ref >= 0, length >= 1, 0 <= edit <= 1")
        items.append(item)
    return items


def nearest_aligned(value: int, point: int, max_value: int) -> int:
    """Open-Sora's ``align``: round ``value`` to a multiple of ``point`` (down, or up past half, while
    staying below the last multiple under ``max_value``)."""
    t = value // point
    if value % point > point / 2 and t < max_value // point - 1:
        t += 1
    return t * point


def apply_mask_strategy(z: torch.Tensor, refs: list[torch.Tensor], items: list[MaskItem], loop: int = 0,
                        align: int | None = None) -> torch.Tensor | None:  # fmt: skip
    """Write the references' latent frames into ``z`` (1, C, T, h, w) where ``items`` say, for loop
    ``loop``; returns the (1, T) frame mask (1 = generated, edit ratio where conditioned) or None."""
    T = z.shape[2]
    mask = torch.ones(1, T, device=z.device)
    used = False
    for it in items:
        if it.loop != loop:
            continue
        if it.ref >= len(refs):
            raise UsageError(f"mask strategy names reference {it.ref} but the prompt has {len(refs)}")
        ref = refs[it.ref]  # (C, t, h, w)
        rs = it.ref_start + ref.shape[1] if it.ref_start < 0 else it.ref_start
        ts = it.target_start + T if it.target_start < 0 else it.target_start
        if align is not None:
            rs, ts = nearest_aligned(rs, align, ref.shape[1]), nearest_aligned(ts, align, T)
        n = min(it.length, T - ts, ref.shape[1] - rs)
        if n <= 0 or rs < 0 or ts < 0:
            continue
        z[0, :, ts : ts + n] = ref[:, rs : rs + n].to(z.dtype)
        mask[0, ts : ts + n] = it.edit
        used = True
    return mask if used else None


def reference_latents(
    opts: SampleOptions, vae, lat_frames: int, device, dtype, path: str | None = None, whole: bool = False
) -> torch.Tensor:
    """The first ``reference_frames`` frames of ``opts.reference`` (an image or a video, decoded with PyAV),
    resized to cover the output size and centre-cropped, encoded with the VAE's posterior mean:
    (1, C, k, h, w) latents for the first k latent frames of every clip (k < the clip's latent frames)."""
    from opensora_fast.io import read_video

    H, W = opts.size()
    if opts.frames() == 1:
        raise UsageError("--reference conditions the first frames of a video: use a video duration, not 'image'")
    path = opts.reference if path is None else path
    try:
        if whole:  # a mask strategy picks the frames: up to the clip's length
            ref = read_video(path, size=(H, W))[: opts.frames()]
        else:
            ref = read_video(path, num_frames=opts.reference_frames, size=(H, W))  # (n, 3, H, W)
    except ValueError as e:
        raise UsageError(f"--reference {path!r}: {e}") from None
    ref = ref.permute(1, 0, 2, 3)[None].to(device=device, dtype=dtype)  # (1, 3, n, H, W)
    z = vae.encode(ref, sample=False)
    if not whole and z.shape[2] >= lat_frames:
        raise UsageError(
            f"--reference-frames {opts.reference_frames} fill {z.shape[2]} of the clip's {lat_frames} latent "
            f"frames: nothing left to generate; use fewer reference frames or a longer --duration"
        )
    return z


def plan_for(opts: SampleOptions, device: torch.device):
    """(plan, budget bytes, what the budget is, fits): the memory plan for these options on ``device``, with
    the savers given on the command line and the rest chosen (``opensora_fast.memory.LADDER``) so that
    the traced peak fits the budget (``--memory-budget``, else the device's free memory, else the
    machine's available RAM; a dry run without a GPU plans for a 24 GiB card). Outside a dry run, raises
    UsageError naming the sizes and the flags that would fit when it does not fit."""
    from opensora_fast import memory

    GiB = memory.GiB
    if opts.memory_budget is not None:
        budget, what = int(opts.memory_budget * GiB), "--memory-budget"
    elif opts.dry_run and device.type != "cuda":
        budget, what = 24 * GiB, "a 24 GiB card (--memory-budget to change)"
    else:
        budget, what = memory.device_budget(device)
    on_cpu = device.type == "cpu" and not opts.dry_run
    fixed = dict(
        model=opts.model,
        vae=opts.vae,
        t5=opts.t5,
        dtype="fp32" if on_cpu else opts.dtype,
        t5_dtype="fp32" if on_cpu else opts.t5_dtype,
        decode_to_cpu=True,
    )
    given = {}
    if opts.offload != "auto":
        given["offload"] = opts.offload
    for k in ("cfg_sequential", "mlp_chunks", "vae_micro_batch", "vae_tile"):
        if getattr(opts, k) is not None:
            given[k] = getattr(opts, k)
    H, W = opts.size()
    T = opts.frames()
    plan, ok = memory.fit_plan(budget, T, (H, W), batch=opts.batch_size, **fixed, **given)
    if ok or opts.dry_run:
        return plan, budget, what, ok
    hint = ""
    if given:
        free, ok_free = memory.fit_plan(budget, T, (H, W), batch=opts.batch_size, **fixed)
        if ok_free:
            hint = f"; these flags would fit ({free.peak / GiB:.1f} GiB): {free.flags()}"
    raise UsageError(
        f"{T} frames at {H}x{W} need {plan.peak / GiB:.1f} GiB at the peak ({plan.flags()}) but {budget / GiB:.1f} "
        f"GiB is {what}{hint or '; no saver fits: use a lower --resolution or a shorter --duration'}"
        " (--dry-run shows the plan)"
    )


def generate(opts: SampleOptions) -> list[str]:
    """Sample one clip per prompt (prompt i uses seed + i); returns the written file paths.

    Under ``torchrun`` (WORLD_SIZE > 1) every rank runs the same sampling loop and the STDiT3 is split over
    the ranks (``opensora_fast.parallel``): with an even world and ``cfg_parallel`` the (cond, uncond) pair
    over 2 groups of ranks (no activation traffic) and each group sequence-parallel over its world / 2
    ranks; otherwise sequence-parallel over all. Rank 0 decodes and writes the files (other ranks return
    an empty list)."""
    from opensora_fast.models.stdit3 import STDiT3
    from opensora_fast.rflow import RFlow
    from opensora_fast.text import T5TextEncoder, null_caption

    if opts.dry_run:
        return dry_run(opts)
    model_path = require_path(opts.model, "--model", "the STDiT3 weights (a directory with config.json)")
    vae_path = require_path(opts.vae, "--vae", "the VAE weights")
    t5_path = require_path(opts.t5, "--t5", "the T5 encoder directory")
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from opensora_fast.train import init_distributed

        rank, world, dev = init_distributed(device=opts.device)
        opts.device = str(dev)
        opts.progress = opts.progress and rank == 0
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[opts.dtype]
    if device.type == "cpu":
        dtype = torch.float32

    say = print if rank == 0 else (lambda *a, **k: None)
    from opensora_fast.memory import chunk_mlps

    # prompts [start_index:end_index], each with its JSON suffix (references, mask strategy) split off
    entries = []
    for j in range(len(opts.prompts))[opts.start_index : opts.end_index]:
        text_j, refs_j, ms_j = split_prompt_json(opts.prompts[j])
        parse_mask_strategy(ms_j)
        entries.append((j, text_j.strip(), opts.reference if refs_j is None else refs_j,
                        opts.mask_strategy if ms_j is None else ms_j))  # fmt: skip
        for path in (entries[-1][2] or "").split(";"):
            if path and not os.path.isfile(path):
                raise UsageError(f"reference {path!r} (prompt {j}) does not exist")
    # the memory plan, checked before anything is allocated (one process; under torchrun each rank holds
    # a share of the activations and the defaults apply)
    plan = plan_for(opts, device)[0] if world == 1 else None
    offload = plan.offload if plan else "t5"
    if plan:
        say(f"memory plan: peak {plan.peak / 2**30:.1f} GiB ({plan.flags()})", flush=True)
    drop = 0  # with --loop: the pixel frames of each later loop that repeat the previous loop's last ones
    if opts.loop > 1:  # checked before any weights are read
        if world > 1:
            raise UsageError("--loop runs one process: it is not supported under torchrun")
        if offload == "all":
            raise UsageError(
                f"--loop decodes and encodes between loops, so the STDiT3 and the VAE stay together, but the memory "
                f"plan offloads all ({plan.flags()}): give --offload t5 with a larger --memory-budget, or fewer frames"
            )
        drop = loop_drop_frames(vae_path, opts.condition_frame_length, opts.frames(), opts.size())

    # 1. T5 (bf16 on a GPU unless --t5-dtype fp32): every prompt encoded, then T5 freed (unless --offload none)
    t5_dtype = torch.float32 if device.type == "cpu" or opts.t5_dtype == "fp32" else torch.bfloat16
    text = T5TextEncoder(t5_path, model_max_length=_model_max_length(model_path), device=device, dtype=t5_dtype)
    text_dim = text.output_dim
    encoded = []  # per prompt: per loop, (y, text mask); a text is encoded once per prompt
    for e in entries:
        texts = loop_prompts(e[1], opts)
        once = {}
        for t in texts:
            if t not in once:
                out = text.encode([t])
                once[t] = (out["y"].to(dtype), out["mask"])
        encoded.append([once[t] for t in texts])
    if offload != "none":
        del text
        _free(device)

    # 2. STDiT3 + VAE
    model = STDiT3.from_pretrained(model_path).to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae = load_vae(vae_path, device=device, dtype=dtype)
    check_compatible(model, vae, text_dim)
    if plan:
        if plan.mlp_chunks > 1:
            chunk_mlps(model, plan.mlp_chunks)
        _set_micro_batch(vae, plan.vae_micro_batch)
    if world > 1:
        from opensora_fast.parallel import enable_batch_parallel, enable_sequence_parallel, parallel_mesh

        bp = 2 if opts.cfg_parallel and world % 2 == 0 else 1
        batch_group, seq_group = parallel_mesh(world, bp)
        if batch_group is not None:
            enable_batch_parallel(model, batch_group)
        if seq_group is not None:
            enable_sequence_parallel(model, seq_group, mode=opts.sp_mode)
        say(f"STDiT3 over {world} processes ({device.type}): CFG-parallel {bp} x sequence-parallel {world // bp}"
            f" ({opts.sp_mode})", flush=True)  # fmt: skip

    H, W = opts.size()
    T = opts.frames()
    lat = vae.get_latent_size((T, H, W))
    f = vae.cfg.spatial.downsample
    if (lat[1] * f, lat[2] * f) != (H, W):
        say(f"note: {H}x{W} is not a multiple of the VAE's {f}x{f} spatial downsampling: the clip will be "
            f"{lat[1] * f}x{lat[2] * f}", flush=True)  # fmt: skip
    fps = IMAGE_FPS if T == 1 else opts.fps
    scheduler = RFlow(
        num_sampling_steps=opts.steps, cfg_scale=opts.cfg, use_timestep_transform=not opts.no_timestep_transform
    )
    size_args = {
        k: torch.tensor([float(v)], device=device, dtype=dtype)
        for k, v in (("height", H), ("width", W), ("num_frames", T), ("fps", fps))
    }
    conds = []  # per prompt: (reference latents [(C, t, h, w)], mask items) or None
    for j, _, refs_j, ms_j in entries:
        if not refs_j:
            conds.append(None)
            continue
        whole = ms_j is not None
        refs = [reference_latents(opts, vae, lat[0], device, dtype, path=p, whole=whole)[0] for p in refs_j.split(";")]
        # without a mask strategy: the first reference's latent frames start the clip, never noised
        items = parse_mask_strategy(ms_j) if whole else [MaskItem(length=refs[0].shape[1])]
        conds.append((refs, items))
        what = f"mask strategy {ms_j!r}" if whole else f"{refs[0].shape[1]} of {lat[0]} latent frames"
        say(f"prompt {j}: conditioning on {refs_j!r}: {what}", flush=True)
    latent_channels = vae.out_channels
    if offload == "all":  # the VAE comes back for the decode, after the STDiT3 has gone
        del vae
        _free(device)
    os.makedirs(opts.out_dir, exist_ok=True)
    paths, pending = [], []  # under torchrun / --offload all: latents kept until the model is gone
    ext = ".png" if T == 1 else ".mp4"
    jobs = [(e, c, k, enc) for e, c, enc in zip(entries, conds, encoded) for k in range(opts.num_sample)]
    todo = []  # (name, prompt, loop 0's noise z, (refs, mask items) or None, [(y, text mask)] per loop, generator)
    for n, ((i, prompt, _, _), cref, k, enc) in enumerate(jobs):
        name = f"{i:03d}_{slug(prompt)}" + (f"_s{k}" if opts.num_sample > 1 else "")
        if opts.skip_existing and os.path.exists(os.path.join(opts.out_dir, name + ext)):
            say(f"[{n + 1}/{len(jobs)}] {name}{ext} exists: skipped", flush=True)
            continue
        g = torch.Generator(device=device).manual_seed(opts.seed + i + k * len(opts.prompts))
        z = torch.randn((1, latent_channels, *lat), generator=g, device=device, dtype=dtype)
        todo.append((name, prompt, z, cref, enc, g))
    tile = plan.vae_tile if plan else None
    for b0 in range(0, len(todo), opts.batch_size):  # --batch-size clips per sampler forward
        group = todo[b0 : b0 + opts.batch_size]
        B = len(group)
        generated = [[] for _ in group]  # with --loop: each loop's clip re-encoded, the references of the next
        videos = [[] for _ in group]  # with --loop: each loop's frames
        for li in range(opts.loop):
            zs, masks = [], []
            for j, e in enumerate(group):
                # loop li > 0: fresh noise from the clip's generator, the last condition_frame_length latent frames
                # of loop li - 1 (decoded and encoded again) at its start (Open-Sora's append_generated)
                z = e[2] if li == 0 else torch.randn(e[2].shape, generator=e[5], device=device, dtype=dtype)
                refs, items = e[3] if e[3] is not None else ([], [])
                refs = [*refs, *generated[j]]
                if li > 0:
                    cfl = opts.condition_frame_length
                    items = [*items, MaskItem(li, len(refs) - 1, -cfl, 0, cfl, opts.condition_frame_edit)]
                zs.append(z)
                masks.append(apply_mask_strategy(z, refs, items, loop=li, align=opts.align) if items else None)
                what = f" (loop {li + 1}/{opts.loop})" if opts.loop > 1 else ""
                say(f"[{b0 + j + 1}/{len(todo)}] {e[1]!r}{what}: {T} frame(s) at {H}x{W}, "
                    f"latent {tuple(lat)}", flush=True)  # fmt: skip
            cond = {}
            if any(m is not None for m in masks):
                ones = torch.ones(1, lat[0], device=device)
                cond = dict(cond_mask=torch.cat([ones if m is None else m for m in masks]))
            z = scheduler.sample(
                model,
                torch.cat(zs),
                torch.cat([e[4][li][0] for e in group]),
                null_caption(model, B),
                text_mask=torch.cat([e[4][li][1] for e in group]),
                generator=group[0][5],
                progress=opts.progress,
                cfg_sequential=bool(plan and plan.cfg_sequential),
                **{k: v if k == "fps" else v.repeat(B) for k, v in size_args.items()},
                **cond,
            )
            for j, (e, zi) in enumerate(zip(group, z.split(1))):
                if opts.loop == 1:
                    pending.append((e[0], zi))
                    if world == 1 and offload != "all":
                        paths.append(_write(vae, *pending.pop(), T, dtype, opts, plan))
                    continue
                video = vae.decode(zi.to(dtype), num_frames=T, spatial_tile=tile)  # (1, 3, T, H, W) on the device
                if li < opts.loop - 1:
                    generated[j].append(vae.encode(video.to(dtype), sample=False)[0])
                videos[j].append(video[0, :, drop if li > 0 else 0 :].float().cpu())
        for e, frames in zip(group, videos):
            if frames:
                paths.append(_write_frames(e[0], torch.cat(frames, dim=1), T, opts))
    if world == 1 and offload == "all":
        del model
        _free(device)
        vae = load_vae(vae_path, device=device, dtype=dtype)
        _set_micro_batch(vae, plan.vae_micro_batch)
        paths = [_write(vae, name, z, T, dtype, opts, plan) for name, z in pending]
    if world > 1:
        # every rank decodes a share of each clip's temporal chunks (parallel.parallel_decode), rank 0 gets
        # the frames; then the ranks leave the group together (a rank leaving while another still talks to
        # it can abort under gloo) and rank 0 writes the files
        import torch.distributed as dist

        from opensora_fast.parallel import parallel_decode

        if offload == "all":
            del model
            _free(device)
            vae = load_vae(vae_path, device=device, dtype=dtype)
        tile = plan.vae_tile if plan else None
        videos = [
            (name, parallel_decode(vae, z.to(dtype), T, out_device="cpu", spatial_tile=tile)) for name, z in pending
        ]
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            paths = [_write_frames(name, video[0], T, opts) for name, video in videos]
    return paths


def loop_drop_frames(vae_path: str, condition_frame_length: int, num_frames: int, size: tuple[int, int]) -> int:
    """The pixel frames that the conditioning of a later loop repeats (Open-Sora's ``dframe_to_frame``: 5 latent
    frames = 17 frames for the release's VAE, i.e. whole VAE chunks), from the VAE's configuration at ``vae_path``
    (built on the meta device: no weights read); UsageError unless ``condition_frame_length`` is whole chunks and
    shorter than the clip's latent frames."""
    from opensora_fast.models.vae import OpenSoraVAE, OpenSoraVAEConfig

    with torch.device("meta"):
        vae = OpenSoraVAE(OpenSoraVAEConfig.from_json_beside(vae_path) or OpenSoraVAEConfig.v1_2())
    m = vae.cfg.micro_frame_size
    per_chunk = vae.get_latent_size((m, *size))[0]
    latent_frames = vae.get_latent_size((num_frames, *size))[0]
    cfl = condition_frame_length
    if cfl % per_chunk:
        raise UsageError(f"--condition-frame-length must be a multiple of {per_chunk} latent frames (one VAE chunk of "
                         f"{m} frames), got {cfl}")  # fmt: skip
    if cfl >= latent_frames:
        raise UsageError(f"--condition-frame-length {cfl} fills the clip's {latent_frames} latent frames: nothing left "
                         "to generate in a loop; use a longer clip or fewer condition frames")  # fmt: skip
    return cfl // per_chunk * m


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _set_micro_batch(vae, n: int) -> None:
    """Frames per 2D VAE call (the config is frozen: a copy with the new value)."""
    import dataclasses

    vae.cfg = dataclasses.replace(vae.cfg, spatial=dataclasses.replace(vae.cfg.spatial, micro_batch_size=n))


def _model_max_length(model_path: str) -> int:
    """The STDiT3's caption length from its config.json (300, the release's, without one)."""
    import json

    cfg = os.path.join(model_path, "config.json")
    if os.path.isdir(model_path) and os.path.isfile(cfg):
        with open(cfg) as f:
            return int(json.load(f).get("model_max_length", 300))
    return 300


def dry_run(opts: SampleOptions) -> list[str]:
    """Print the memory plan (traced on the meta device; no weights read beyond config.json files) and
    whether it fits; returns no paths."""
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan, budget, what, ok = plan_for(opts, device)
    print(plan.describe())
    verdict = "fits" if ok else "does NOT fit"
    print(f"  {verdict} in {budget / 2**30:.1f} GiB ({what})", flush=True)
    return []


def _write(vae, name: str, z: torch.Tensor, T: int, dtype, opts: SampleOptions, plan=None) -> str:
    """Decode one clip's latents (streamed to the CPU, chunk by chunk, with the plan's VAE tile) and write
    its mp4 (png for an image); returns the path."""
    tile = plan.vae_tile if plan else None
    video = vae.decode(z.to(dtype), num_frames=T, out_device="cpu", spatial_tile=tile)[0]  # (3, T, H', W')
    return _write_frames(name, video, T, opts)


def _write_frames(name: str, video: torch.Tensor, T: int, opts: SampleOptions) -> str:
    """Write decoded frames (3, T, H, W) in [-1, 1] as the clip's mp4 (png for an image); returns the path."""
    from opensora_fast.io import write_video

    path = free_name(os.path.join(opts.out_dir, name), ".png" if T == 1 else ".mp4")
    if T == 1:
        path = write_image(path, video[:, 0])
    else:
        path = write_video(path, video, fps=opts.fps)
    print(f"wrote {path}", flush=True)
    return path


__all__ = ["SampleOptions", "generate", "DURATIONS"]

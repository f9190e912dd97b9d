"""The ``opensora-fast`` command: ``sample``, ``train``, ``demo``, ``check``.

Modules are imported inside each subcommand: ``check`` must enable the Triton interpreter (on machines
without CUDA) before ``opensora_fast.kernels`` is first imported.
"""

from __future__ import annotations

import argparse
import os
import sys

from opensora_fast.data import ASPECT_RATIOS, DURATIONS, RESOLUTIONS


def _size(text: str) -> tuple[int, int]:
    from opensora_fast.data import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _buckets(text: str):
    from opensora_fast.data import parse_buckets

    try:
        return parse_buckets(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _HelpFormatter(argparse.HelpFormatter):
    """Help lines end with "(required)" for required options and "(default: X)" where there is a default."""

    def _get_help_string(self, action):
        h = action.help or ""
        if not action.option_strings or h == argparse.SUPPRESS:
            return h
        if action.required:
            return h + " (required)"
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if shown and "%(default)" not in h:
            return h + " (default: %(default)s)"
        return h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opensora-fast",
        description="Open-Sora 1.2 (STDiT3 + causal 3D VAE) on opensora_fast's Triton kernels",
    )
    sub = p.add_subparsers(
        dest="command", required=True, metavar="{sample,train,train-vae,extract,eval-loss,demo,check}"
    )

    c = sub.add_parser(
        "check", help="check every kernel against its PyTorch reference (fwd + bwd)", formatter_class=_HelpFormatter
    )
    c.set_defaults(func=_check)

    s = sub.add_parser("sample", help="text to video from local Open-Sora 1.2 weights", formatter_class=_HelpFormatter)
    s.add_argument("prompts", nargs="*", help="one clip per prompt")
    s.add_argument("--prompt-file", help="a text file with one prompt per line (added to the positional ones)")
    s.add_argument("--model", help="STDiT3 weights: a directory with config.json + safetensors, local only (required)")
    s.add_argument("--vae", help="OpenSoraVAE weights: a file or directory, local only (required)")
    s.add_argument("--t5", help="T5 encoder + tokenizer directory, local only (required)")
    s.add_argument("--resolution", default="240p", choices=RESOLUTIONS, help="Open-Sora resolution name")
    s.add_argument("--aspect-ratio", default="9:16", choices=ASPECT_RATIOS, help="H:W name, as Open-Sora's")
    s.add_argument(
        "--duration",
        default="4s",
        choices=tuple(DURATIONS),
        help="image=1, 2s=51, 4s=102, 8s=204, 16s=408 frames",
    )
    s.add_argument("--num-frames", type=int, help="a frame count instead of --duration")
    s.add_argument("--image-size", type=_size, metavar="HxW", help="a size instead of --resolution/--aspect-ratio")
    s.add_argument("--seed", type=int, default=42, help="prompt i uses seed + i")
    s.add_argument("--steps", type=int, default=30, help="sampling steps")
    s.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    s.add_argument("--fps", type=int, default=24, help="frame rate of the written mp4 (and the model's fps input)")
    s.add_argument("--aes", type=float, default=6.5, help="aesthetic score appended to prompts; < 0 disables")
    s.add_argument("--flow", type=float, help="motion score appended to prompts (Open-Sora's ' motion score: X.')")
    s.add_argument(
        "--camera-motion",
        help="camera motion appended to prompts (Open-Sora's ' camera motion: X.', e.g. 'pan right', 'static')",
    )
    s.add_argument(
        "--no-prompt-cleaning",
        action="store_true",
        help="give T5 the prompts as written (default: Open-Sora's text_preprocessing, as in its training)",
    )
    s.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="on CUDA; the CPU runs fp32")
    s.add_argument(
        "--reference",
        metavar="PATH",
        help="an image or video every clip starts from (image-to-video, video continuation)",
    )
    s.add_argument("--reference-frames", type=int, default=1, metavar="N", help="use the first N frames of --reference")
    s.add_argument(
        "--mask-strategy",
        metavar="S",
        help="Open-Sora's mask strategy for every prompt without its own: 'loop,ref,ref_start,target_start,length,"
        "edit_ratio[;...]' in latent frames (--reference 'a.mp4;b.png' gives refs 0, 1); a prompt-file line may end "
        'with {"reference_path": ..., "mask_strategy": ...}',
    )
    s.add_argument("--align", type=int, metavar="N", help="round mask-strategy starts to multiples of N latent frames")
    s.add_argument("--batch-size", type=int, default=1, help="clips per sampler forward (each keeps its seed)")
    s.add_argument("--num-sample", type=int, default=1, help="clips per prompt (sample k of prompt j: seed + j + k*P)")
    s.add_argument("--start-index", type=int, default=0, help="sample the prompts from this index (0-based)")
    s.add_argument("--end-index", type=int, help="... up to this index (exclusive); names and seeds stay the same")
    s.add_argument("--skip-existing", action="store_true", help="do not sample a clip whose file already exists")
    from opensora_fast.common import add_options
    from opensora_fast.sample import SampleOptions

    add_options(s, SampleOptions)  # the flags of SampleOptions' option() fields (--loop, ...)
    s.add_argument(
        "--no-cfg-parallel",
        action="store_true",
        help="under torchrun: sequence-parallel only (default with an even process count: the CFG pair over 2 "
        "groups of processes, each sequence-parallel)",
    )
    s.add_argument(
        "--sp-mode",
        default="dsp",
        choices=("dsp", "ulysses", "fastseq"),
        help="under torchrun: the sequence-"
        "parallel scheme (dsp: a layout switch per block; ulysses: Open-Sora's; fastseq: OpenDiT's)",
    )
    s.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    s.add_argument(
        "--out-dir", default="samples", help="where the clips go (an existing name gets a -1, -2, ... suffix)"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    m = s.add_argument_group("memory plan (traced on the meta device; 'auto' picks the first savers that fit)")
    m.add_argument("--dry-run", action="store_true", help="print each stage's traced peak and the plan, then stop")
    m.add_argument(
        "--offload",
        default="auto",
        choices=("auto", "none", "t5", "all"),
        help="what leaves the device after its stage: none; t5 (freed after encoding); all (T5, then the "
        "STDiT3 before decoding)",
    )
    m.add_argument(
        "--cfg-sequential",
        action="store_const",
        const=True,
        default=None,
        help="CFG halves one after the other (half the activations; default: when the plan needs it)",
    )
    m.add_argument("--mlp-chunks", type=int, help="run each MLP over N token chunks (default: as the plan needs)")
    m.add_argument("--vae-micro-batch", type=int, help="frames per 2D VAE decode call (default: 4, or as needed)")
    m.add_argument("--vae-tile", type=int, metavar="PIXELS", help="decode in overlapping spatial tiles of PIXELS")
    m.add_argument("--t5-dtype", default="bf16", choices=("bf16", "fp32"), help="T5 weights on a GPU (CPU: fp32)")
    m.add_argument(
        "--memory-budget",
        type=float,
        metavar="GIB",
        help="plan for this many GiB (default: the device's free memory; RAM on a CPU; a dry run without a GPU: 24)",
    )
    s.set_defaults(func=_sample)

    t = sub.add_parser(
        "train",
        help="train STDiT3 on a CSV of (path, text) videos; torchrun for several GPUs",
        formatter_class=_HelpFormatter,
    )
    from opensora_fast.train import DiTTrainConfig, TrainRun

    add_options(t, TrainRun)  # the flags and their defaults come from these two dataclasses
    add_options(t, DiTTrainConfig)
    t.set_defaults(func=_train)

    from opensora_fast.features import ExtractOptions

    e = sub.add_parser(
        "extract",
        help="VAE latents + T5 embeddings of a training set, once (for train --features)",
        formatter_class=_HelpFormatter,
    )
    add_options(e, ExtractOptions)
    e.set_defaults(func=_extract)

    from opensora_fast.vae_train import VAERunOptions

    tv = sub.add_parser(
        "train-vae",
        help="train the VAE: Open-Sora 1.2's stage 1, 2 or 3 (--stage)",
        formatter_class=_HelpFormatter,
    )
    add_options(tv, VAERunOptions)
    tv.set_defaults(func=_train_vae)

    from opensora_fast.train import EvalOptions

    v = sub.add_parser(
        "eval-loss",
        help="Open-Sora 1.2's evaluation loss of a checkpoint (10 timesteps per bucket, fixed noise)",
        formatter_class=_HelpFormatter,
    )
    add_options(v, EvalOptions)
    v.set_defaults(func=_eval_loss)

    d = sub.add_parser(
        "demo",
        help="train tiny models on synthetic moving shapes and sample a clip (CPU: minutes)",
        formatter_class=_HelpFormatter,
    )
    d.add_argument("--out-dir", default="opensora-fast-demo", help="data, weights, the clip and the loss plot")
    d.add_argument("--steps-vae", type=int, help="VAE training steps (default 120; --quick 12)")
    d.add_argument("--steps-dit", type=int, help="STDiT3 training steps (default 250; --quick 40)")
    d.add_argument("--seed", type=int, default=0, help="data, training and sampling seed")
    d.add_argument("--quick", action="store_true", help="an even smaller run (for tests / CI, < 1 min on CPU)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--strict", action="store_true", help="a failed check (colour, direction, seeds) is an error")
    d.set_defaults(func=_demo)
    return p


def _check(args) -> int:
    from opensora_fast.check import main as check_main

    return check_main([])


def _sample(args) -> int:
    from opensora_fast.common import cli_fields
    from opensora_fast.sample import SampleOptions, generate, read_prompt_file

    prompts = list(args.prompts) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    opts = SampleOptions(
        prompts=prompts,
        model=args.model,
        vae=args.vae,
        t5=args.t5,
        resolution=args.resolution,
        aspect_ratio=args.aspect_ratio,
        duration=args.duration,
        num_frames=args.num_frames,
        image_size=args.image_size,
        seed=args.seed,
        steps=args.steps,
        cfg=args.cfg,
        fps=args.fps,
        aes=None if args.aes < 0 else args.aes,
        flow=args.flow,
        camera_motion=args.camera_motion,
        clean_prompts=not args.no_prompt_cleaning,
        dry_run=args.dry_run,
        mask_strategy=args.mask_strategy,
        align=args.align,
        num_sample=args.num_sample,
        batch_size=args.batch_size,
        start_index=args.start_index,
        end_index=args.end_index,
        skip_existing=args.skip_existing,
        offload=args.offload,
        cfg_sequential=args.cfg_sequential,
        mlp_chunks=args.mlp_chunks,
        vae_micro_batch=args.vae_micro_batch,
        vae_tile=args.vae_tile,
        t5_dtype=args.t5_dtype,
        memory_budget=args.memory_budget,
        out_dir=args.out_dir,
        device=args.device,
        dtype=args.dtype,
        progress=not args.no_progress,
        reference=args.reference,
        reference_frames=args.reference_frames,
        cfg_parallel=not args.no_cfg_parallel,
        sp_mode=args.sp_mode,
        **{f.name: getattr(args, f.name) for f in cli_fields(SampleOptions)},
    )
    try:
        paths = generate(opts)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # torchrun: sequence-parallel sampling
            dist.destroy_process_group()
    if paths:  # under torchrun only rank 0 writes
        print(f"{len(paths)} file(s) in {args.out_dir}:")
        for path in paths:
            print(f"  {path}")
    return 0


def _train(args) -> int:
    from opensora_fast.train import run_train

    return run_train(args)


def _eval_loss(args) -> int:
    from opensora_fast.train import run_eval_loss

    return run_eval_loss(args)


def _train_vae(args) -> int:
    from opensora_fast.vae_train import run_train_vae

    return run_train_vae(args)


def _extract(args) -> int:
    from opensora_fast.features import run_extract

    return run_extract(args)


def _demo(args) -> int:
    from opensora_fast.demo import DemoOptions, run_demo

    run_demo(
        DemoOptions.make(
            out_dir=args.out_dir,
            quick=args.quick,
            steps_vae=args.steps_vae,
            steps_dit=args.steps_dit,
            seed=args.seed,
            progress=not args.no_progress,
            strict=args.strict,
        )
    )
    return 0


def explicit_options(argv: list[str]) -> set[str]:
    """The destinations of the options given on the command line ``argv`` (not left at their defaults)."""
    q = build_parser()
    for action in q._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                for a in sp._actions:
                    if a.dest != "help":
                        a.default = argparse.SUPPRESS
    return set(vars(q.parse_args(argv))) - {"command", "func"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv, args.explicit = argv, explicit_options(argv)
    from opensora_fast.sample import UsageError
    from opensora_fast.train import DistributedFailure

    try:
        return int(args.func(args) or 0)
    except (UsageError, FileNotFoundError, ValueError) as e:  # bad input: one line, no traceback
        print(f"opensora-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except DistributedFailure as e:
        print(f"opensora-fast {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the training loop (which prints its own resume hint)
        print(f"\nopensora-fast {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``opensora-fast`` console script and ``python -m opensora_fast.cli``. Under torchrun the process
    ends with ``os._exit`` after the command has torn its process group down: on this machine 1 in 30-40
    gloo runs otherwise aborted in interpreter finalisation ("terminate called without an active
    exception", exit -6) after every rank had finished and destroyed its group, which torchrun reports as a
    failed job."""
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()

"""The ``opensora-fast`` command: ``sample``, ``train``, ``demo``, ``check``.

Modules are imported inside each subcommand: ``check`` must enable the Triton interpreter (on machines
without CUDA) before ``opensora_fast.kernels`` is first imported.
"""

from __future__ import annotations

import argparse
import os
import sys


class _HelpFormatter(argparse.HelpFormatter):
    """Help lines end with "(required)" for required options and "(default: X)" where there is a default."""

    def _get_help_string(self, action):
        h = action.help or ""
        if not action.option_strings or h == argparse.SUPPRESS:
            return h
        if action.required:
            return h + " (required)"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return h  # a switch: its help says what it changes
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

    from opensora_fast.common import add_options
    from opensora_fast.sample import SampleOptions

    s = sub.add_parser("sample", help="text to video from local Open-Sora 1.2 weights", formatter_class=_HelpFormatter)
    s.add_argument("prompts", nargs="*", help="one clip per prompt")
    s.add_argument("--prompt-file", help="a text file with one prompt per line (added to the positional ones)")
    add_options(s, SampleOptions)  # every other flag and its default: the fields of SampleOptions
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
    _demo_options(d)
    d.set_defaults(func=_demo)
    return p


def _check(args) -> int:
    from opensora_fast.check import main as check_main

    return check_main([])


def _sample(args) -> int:
    from opensora_fast.common import options_from
    from opensora_fast.sample import SampleOptions, generate, read_prompt_file

    prompts = list(args.prompts) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    opts = options_from(SampleOptions, args, prompts=prompts)
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


def _demo_exposed() -> dict[str, dict]:
    """The ``demo`` flags of DemoOptions fields (the rest are the training recipe's): field -> option_meta."""
    from opensora_fast.common import option_meta

    return {
        "out_dir": option_meta("data, weights, the clip and the loss plot"),
        "seed": option_meta("data, training and sampling seed"),
        "progress": option_meta("no progress bars", flag="--no-progress"),
    }


def _demo_options(d: argparse.ArgumentParser) -> None:
    """The demo's flags: DemoOptions fields with their defaults, plus --small / --quick (DemoOptions.make's smaller
    recipes) and --steps-vae / --steps-dit, which override the chosen recipe's step counts."""
    from opensora_fast.common import add_options
    from opensora_fast.demo import DemoOptions

    full, quick = DemoOptions(), DemoOptions.make(DemoOptions.out_dir, quick=True)
    add_options(d, DemoOptions, expose=_demo_exposed())
    d.add_argument(
        "--steps-vae",
        type=int,
        help=f"temporal VAE training steps (default {full.steps_vae}; --quick {quick.steps_vae})",
    )
    d.add_argument(
        "--steps-dit", type=int, help=f"STDiT3 training steps (default {full.steps_dit}; --quick {quick.steps_dit})"
    )
    size = d.add_mutually_exclusive_group()
    size.add_argument(
        "--small",
        action="store_true",
        help="the same recipe and check on 16x16 clips of 9 frames (about 3 min on one CPU core)",
    )
    size.add_argument(
        "--quick", action="store_true", help="a much smaller run whose check is only that seeds differ (< 1 min)"
    )


def _demo(args) -> int:
    from opensora_fast.demo import DemoOptions, run_demo

    kw = {name: getattr(args, name) for name in _demo_exposed()}
    run_demo(
        DemoOptions.make(quick=args.quick, small=args.small, steps_vae=args.steps_vae, steps_dit=args.steps_dit, **kw)
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

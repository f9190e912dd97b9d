"""Where a training step's time goes: N steps of ``opensora-fast train`` under ``torch.profiler``.

    python profiling/profile_train.py --profile-steps 5 --warmup-steps-prof 2 -- \\
        --data data.csv --vae VAE --t5 T5 --buckets 51x240x426 --model-config xl --out-dir /tmp/prof

Everything after ``--`` is a ``train`` command line (``--steps`` is set to warm-up + profiled steps). Prints the
execution summary Open-Sora's report shows, per step (mean over the profiled steps), as time and % of the step:
kernel (GPU compute), memcpy, memset, communication (NCCL / gloo collectives), data loading (waiting for the
DataLoader, from the step's ``data_s``), and CPU (the rest of the step's wall time: host work the GPU did not
hide). On a machine without a GPU the device rows are 0 and communication is the collectives' CPU time. With
``--trace FILE`` the Chrome trace is written too; ``--nvtx`` adds NVTX ranges per op for ``nsys profile``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _category(name: str) -> str:
    n = name.lower()
    if "nccl" in n or "gloo" in n or any(k in n for k in ("all_reduce", "allreduce", "reduce_scatter", "all_gather",
                                                          "alltoall", "all_to_all", "broadcast")):  # fmt: skip
        return "communication"
    if "memcpy" in n:
        return "memcpy"
    if "memset" in n:
        return "memset"
    return "kernel"


def summarize(events, step_s: float, data_s: float, steps: int) -> dict:
    """Seconds per step by category from profiler events (``prof.events()``)."""
    from torch.autograd import DeviceType

    out = {"kernel": 0.0, "memcpy": 0.0, "memset": 0.0, "communication": 0.0}
    for e in events:
        dev = getattr(e, "device_type", None)
        if dev == DeviceType.CUDA:
            out[_category(e.name)] += e.time_range.elapsed_us() * 1e-6
        elif _category(e.name) == "communication" and dev == DeviceType.CPU:
            out["communication"] += e.time_range.elapsed_us() * 1e-6  # CPU collectives (gloo)
    per_step = {k: v / steps for k, v in out.items()}
    per_step["data loading"] = data_s
    busy = sum(per_step.values())
    per_step["CPU"] = max(0.0, step_s - busy)
    per_step["step"] = step_s
    return per_step


def format_summary(s: dict) -> str:
    step = s["step"]
    rows = [f"{'':<16}{'ms / step':>12}{'% of step':>11}"]
    for k in ("kernel", "memcpy", "memset", "communication", "data loading", "CPU"):
        rows.append(f"{k:<16}{1e3 * s[k]:>12.2f}{100 * s[k] / step if step else 0:>10.1f}%")
    rows.append(f"{'step':<16}{1e3 * step:>12.2f}{100.0:>10.1f}%")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import torch

    from opensora_fast import cli
    from opensora_fast import train as T

    argv = list(sys.argv[1:] if argv is None else argv)
    train_argv = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile-steps", type=int, default=5, help="steps recorded")
    p.add_argument("--warmup-steps-prof", type=int, default=2, help="steps run first, not recorded")
    p.add_argument("--trace", help="write the Chrome trace here")
    p.add_argument("--nvtx", action="store_true", help="NVTX ranges per op (run under nsys profile)")
    o = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    total = o.warmup_steps_prof + o.profile_steps
    train_argv = ["train", *train_argv, "--steps", str(total), "--no-progress"]
    args = cli.build_parser().parse_args(train_argv)
    args.argv, args.explicit = train_argv, cli.explicit_options(train_argv)

    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    sched = torch.profiler.schedule(wait=0, warmup=o.warmup_steps_prof, active=o.profile_steps, repeat=1)
    recs = []
    inner = T.train_dit

    def profiled(*a, **kw):
        user = kw.get("on_step")

        def on_step(step, rec):
            recs.append(rec)
            prof.step()
            if user is not None:
                user(step, rec)

        kw["on_step"] = on_step
        return inner(*a, **kw)

    import contextlib

    nvtx = torch.autograd.profiler.emit_nvtx() if o.nvtx else contextlib.nullcontext()
    T.train_dit = profiled
    try:
        with torch.profiler.profile(activities=acts, schedule=sched) as prof, nvtx:
            rc = T.run_train(args)
    finally:
        T.train_dit = inner
    if rc:
        return rc
    active = recs[o.warmup_steps_prof :]
    # the step's wall time from the log's throughput (samples / samples_per_s), the data wait from data_s
    step_s = sum(r["batch"] / r["samples_per_s"] for r in active) / len(active)
    data_s = sum(r["data_s"] for r in active) / len(active)
    s = summarize(prof.events() or [], step_s, data_s, len(active))
    print(f"{len(active)} profiled steps (after {o.warmup_steps_prof} warm-up), shape {active[-1]['shape']}, "
          f"batch {active[-1]['batch']}")  # fmt: skip
    print(format_summary(s))
    if o.trace:
        prof.export_chrome_trace(o.trace)
        print(f"trace: {o.trace}")
    with open(os.path.join(args.out_dir, "profile.json"), "w") as f:
        json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

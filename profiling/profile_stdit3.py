"""Profile STDiT3 denoising steps: ``python -m profiling.profile_stdit3 [--out DIR] [options]``.

The step is bench/bench_stdit3.py's: random-weight STDiT3, CFG batch 2, 300-token captions with mixed
lengths, ``velocity_only=True``, the text-KV cache warm. Default on CUDA: STDiT3-XL/2 in bf16 at 240p
2 s; on CPU: ``STDiT3Config.tiny()`` in fp32 at a tiny shape, CPU activity only (the kernel path runs
through the Triton interpreter, so the CPU trace shows the interpreter, not GPU behaviour).

``--profiler torch`` (default) runs ``--steps`` steps under torch.profiler (CPU + CUDA activities,
record_shapes) after ``--warmup`` steps and writes to ``--out``:

- ``trace.json``: Chrome trace (open in chrome://tracing or https://ui.perfetto.dev);
- ``ops.txt``: torch.profiler's operator table, sorted by self CUDA time (self CPU time on CPU);
- ``kernels.txt`` (CUDA only): every GPU kernel by total CUDA time: calls, total, mean, share;
- ``run.json``: the configuration profiled.

``--profiler none`` runs the same steps between cudaProfilerStart/Stop (for ``nsys
--capture-range=cudaProfilerApi``, see nsys_stdit3.sh); ``--nvtx`` turns on the model's NVTX ranges per
block (STDiT3Config.nvtx) and adds one range per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections import defaultdict
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before any Triton kernel is defined (opensora_fast.kernels import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tqdm import tqdm  # noqa: E402

from bench.bench_stdit3 import (  # noqa: E402
    LENGTHS,
    PROVIDERS,
    RESOLUTIONS,
    TEXT_LENS,
    TINY_LENGTHS,
    TINY_RES,
    TINY_TEXT_LENS,
    build_model,
    provider,
    step_inputs,
)
from bench.harness import HAS_CUDA  # noqa: E402
from opensora_fast.models.stdit3 import STDiT3Config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="profiling/out", help="output directory")
    p.add_argument("--config", choices=("xl2", "tiny"), default="xl2" if HAS_CUDA else "tiny")
    p.add_argument("--res", choices=sorted(RESOLUTIONS), default="240p", help="XL/2 only")
    p.add_argument("--length", choices=sorted(LENGTHS), default="2s", help="XL/2 only")
    p.add_argument("--backend", choices=[k for k, gpu_only in PROVIDERS.items() if not gpu_only],
                   default="opensora_fast")  # fmt: skip
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (compile, caches)")
    p.add_argument("--profiler", choices=("torch", "none"), default="torch")
    p.add_argument("--nvtx", action="store_true", help="NVTX ranges per block and per step (CUDA)")
    p.add_argument("--rows", type=int, default=40, help="rows of the tables")
    args = p.parse_args(argv)
    if args.profiler == "none" and not HAS_CUDA:
        p.error("--profiler none (cudaProfilerApi capture for nsys) needs CUDA")
    return args


def kernel_table(events, rows: int) -> str:
    """GPU kernels (and memcpy/memset) aggregated by name, by total CUDA time."""
    tot: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name] += e.time_range.elapsed_us()
            calls[e.name] += 1
    total = sum(tot.values())
    lines = [f"GPU time {total / 1e3:.3f} ms in {sum(calls.values())} kernel calls", "",
             f"{'share':>6} {'total ms':>10} {'calls':>7} {'mean us':>9}  kernel"]  # fmt: skip
    for name in sorted(tot, key=tot.get, reverse=True)[:rows]:
        share = 100 * tot[name] / total if total else 0.0
        ms, n = tot[name] / 1e3, calls[name]
        lines.append(f"{share:5.1f}% {ms:10.3f} {n:7d} {tot[name] / n:9.1f}  {name}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    device = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    if args.config == "tiny":
        cfg = STDiT3Config.tiny(nvtx=args.nvtx)
        res, length, text_lens = TINY_RES["tiny"], TINY_LENGTHS["2f"], TINY_TEXT_LENS
        shape = "tiny"
    else:
        cfg = STDiT3Config.xl_2(nvtx=args.nvtx)
        res, length, text_lens = RESOLUTIONS[args.res], LENGTHS[args.length], TEXT_LENS
        shape = f"{args.res} {args.length}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = dict(vars(args), device=device, dtype=str(dtype), shape=shape, latent=list(res[:2]),
               latent_frames=length[0], text_lens=list(text_lens), batch=2)  # fmt: skip
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")

    with provider(args.backend):
        model = build_model(cfg, device, dtype).eval()
        inputs = step_inputs(cfg, 2, res, length, text_lens, device, dtype)
    inputs.pop("num_frames")
    nvtx = args.nvtx and HAS_CUDA

    def step(i: int):
        rng = torch.cuda.nvtx.range(f"step[{i}]") if nvtx else contextlib.nullcontext()
        with rng, provider(args.backend), torch.no_grad():
            y = model(**inputs, velocity_only=True)
        if HAS_CUDA:
            torch.cuda.synchronize()
        return y

    with model.text_kv_cache():
        for i in tqdm(range(args.warmup), desc="warm-up"):
            step(i)
        steps = range(args.warmup, args.warmup + args.steps)
        if args.profiler == "none":
            torch.cuda.profiler.start()
            for i in tqdm(steps, desc="steps (nsys capture)"):
                step(i)
            torch.cuda.profiler.stop()
            print(f"{args.steps} steps captured between cudaProfilerStart/Stop")
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if HAS_CUDA:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            for i in tqdm(steps, desc="profiled steps"):
                step(i)

    prof.export_chrome_trace(str(out / "trace.json"))
    sort = "self_device_time_total" if HAS_CUDA else "self_cpu_time_total"
    (out / "ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=args.rows) + "\n")
    written = ["run.json", "trace.json", "ops.txt"]
    if HAS_CUDA:
        (out / "kernels.txt").write_text(kernel_table(prof.events(), args.rows))
        written.append("kernels.txt")
    print(f"wrote {', '.join(str(out / f) for f in written)}")


if __name__ == "__main__":
    main()

"""Sequence-parallel communication of STDiT3 (issue 10): bytes per step, exposed communication, overlap.

Run under torchrun (CPU/gloo at small shapes; CUDA/NCCL when every local rank has a GPU)::

    torchrun --nproc_per_node 2 -m bench.bench_parallel --size 3,8,12 --modes dsp,ulysses,fastseq
    torchrun --nproc_per_node 8 -m bench.bench_parallel --model xl --size 30,30,54 --dtype bf16 --steps 5

One JSON line per mode on rank 0's stdout (``--out`` appends them to a file too), for a training step
(forward + backward into every parameter, gradients summed over the group with ``GradSync``):

- ``bytes``: bytes received per rank per step, counted at the collectives (all-to-all and reduce-scatter:
  (p-1)/p of the input; all-gather and broadcast: what arrives from the other ranks; all-reduce:
  2 (p-1)/p, a ring's traffic), split into ``act`` (activations) and ``grad`` (the gradient sum);
  ``formula`` is NOTES.md's closed form for ``act`` (``expected_act_bytes``), ``match`` whether they agree.
- ``t_on`` / ``t_off``: median step time with ``overlap=True`` / ``False``; ``t_nocomm``: the same
  overlapped step with every collective replaced by a local copy of the right shape (compute only).
  Communication time ``comm = t_off - t_nocomm``, exposed ``exposed = t_on - t_nocomm``, ``overlap_pct =
  100 (comm - exposed) / comm`` (chunking's own compute cost counts as exposed).
- One process (world 1): the strategy is installed on a 1-rank group, so ``t_on`` / ``t_off`` against
  ``t_plain`` (no strategy) is the overlap machinery's own cost.

Timings on a shared CPU are not performance figures; the byte counts are exact anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from opensora_fast import parallel as P
from opensora_fast.models.stdit3 import STDiT3, STDiT3Config

_COLLECTIVES = tuple(
    n
    for n in (
        "all_to_all_single",
        "broadcast",
        "reduce_scatter_single",
        "reduce_scatter_tensor",
        "all_gather",
        "all_reduce",
        "gather",
    )  # fmt: skip
    if hasattr(dist, n)
)


def expected_act_bytes(mode: str, p: int, *, B: int, T: int, S: int, C: int, cout: int, depth: int, es: int) -> int:
    """NOTES.md's formula: activation bytes received per rank in one training step (forward + backward).

    Tp = ceil(T / p), Sp = ceil(S / p) (padded shards), u = B * T * Sp * C * es (one tokens-layout shard).
    The final layer's all-gather brings (p-1) * B * T * Sp * cout * es in the forward (its backward is local).
    - dsp: 2 * depth - 1 layout switches (the first split is local), each an all-to-all of one padded shard
      B * Tp * Sp * p * C * es of which (p-1)/p arrives; forward and backward: 2 (2 depth - 1) switches.
    - ulysses: per spatial block the q, k, v all-to-all (3 u, (p-1)/p of it arrives) and the output's (u),
      forward and backward: depth * 2 * 4 * (p-1)/p * u.
    - fastseq: per spatial block the all-gather ((p-1) u) and the output all-to-all ((p-1)/p u); backward:
      the reduce-scatter ((p-1) u) and the all-to-all: depth * 2 * ((p-1) + (p-1)/p) * u.
    The gradient sum (not counted here) is 2 (p-1)/p * parameter bytes per step (ring all-reduce).
    """
    Tp, Sp = -(-T // p), -(-S // p)
    u = B * T * Sp * C * es
    final = (p - 1) * B * T * Sp * cout * es
    if mode == "dsp":
        switch = (p - 1) * B * Tp * Sp * C * es  # (p-1)/p of the padded p*Tp*Sp*B*C block
        return 2 * (2 * depth - 1) * switch + final
    if mode == "ulysses":
        return depth * 2 * 4 * (p - 1) * u // p + final
    return depth * 2 * ((p - 1) * u + (p - 1) * u // p) + final


class _Counter:
    """Wraps torch.distributed's collectives: counts received bytes per kind; ``noop`` replaces them with
    local copies of the right shape (compute-only runs)."""

    def __init__(self):
        self.orig = {n: getattr(dist, n) for n in _COLLECTIVES}
        self.bytes = {"act": 0, "grad": 0}
        self.noop = False

    def install(self):
        for n in _COLLECTIVES:
            setattr(dist, n, self._wrap(n, self.orig[n]))

    def uninstall(self):
        for n, f in self.orig.items():
            setattr(dist, n, f)

    def _wrap(self, name, fn):
        def f(*a, **k):
            group = k.get("group")
            p = dist.get_world_size(group)
            rs = name.startswith("reduce_scatter")
            t = a[1] if name in ("all_to_all_single", "gather") or rs else a[0]
            size = t.numel() * t.element_size() if torch.is_tensor(t) else 0
            kind = "grad" if name == "all_reduce" else "act"
            if name == "all_to_all_single" or rs:
                n = size * (p - 1) // p
            elif name == "all_gather":
                n = a[1].numel() * a[1].element_size() * (p - 1)
            elif name == "broadcast":
                n = 0 if k.get("src") == dist.get_rank() else size
            elif name == "all_reduce":
                n = 2 * size * (p - 1) // p
            else:
                n = 0
            self.bytes[kind] += n
            if not self.noop:
                return fn(*a, **k)
            if name == "all_to_all_single":
                a[0].copy_(a[1])
            elif rs:
                a[0].copy_(a[1].view(p, -1)[dist.get_rank(group)].view_as(a[0]))
            elif name == "all_gather":
                for o in a[0]:
                    o.copy_(a[1])
            return _Done() if k.get("async_op") else None

        return f


class _Done:
    def wait(self):
        return True


def _model(name: str, dtype, device):
    cfg = {"tiny": STDiT3Config.tiny, "small": STDiT3Config.small, "xl": STDiT3Config.xl_2}[name]
    kw = dict(depth=2) if name == "tiny" else {}
    torch.manual_seed(0)
    return STDiT3(cfg(**kw)).to(device=device, dtype=dtype).train()


def _inputs(model, T, H, W, device, dtype):
    g = torch.Generator().manual_seed(1)
    c = model.config
    x = torch.randn(1, c.in_channels, T, H, W, generator=g).to(device, dtype)
    y = torch.randn(1, 1, c.model_max_length, c.caption_channels, generator=g).to(device, dtype)
    kw = dict(mask=torch.ones(1, c.model_max_length, dtype=torch.long, device=device),
              fps=torch.tensor([24.0], device=device), height=torch.tensor([256.0], device=device),
              width=torch.tensor([256.0], device=device))  # fmt: skip
    return x, torch.tensor([500.0], device=device), y, kw


def _step(model, inp):
    """One training step's forward + backward (GradSync, when installed, sums the gradients in it)."""
    x, t, y, kw = inp
    model.zero_grad(set_to_none=True)
    model(x, t, y, **kw).float().square().mean().backward()


def _time(fn, steps: int, cuda: bool) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="dsp,ulysses,fastseq")
    ap.add_argument("--model", default="tiny", choices=["tiny", "small", "xl"])
    ap.add_argument("--size", default="3,8,12", help="latent T,H,W")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cuda-profile", action="store_true", help="cudaProfilerStart/Stop around the timed steps")
    args = ap.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= torch.cuda.device_count()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # a plain `python -m bench.bench_parallel`: a 1-rank group
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
            dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
        else:
            dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    T, H, W = (int(v) for v in args.size.split(","))
    counter = _Counter()
    counter.install()
    rank = dist.get_rank()
    lines = []
    plain = None
    if world == 1:
        m = _model(args.model, dtype, device)
        inp = _inputs(m, T, H, W, device, dtype)
        plain = _time(lambda: _step(m, inp), args.steps, cuda)
    for mode in args.modes.split(","):
        models, res = {}, {"mode": mode, "world": world, "model": args.model, "size": [T, H, W],
                           "dtype": args.dtype, "device": device.type, "chunks": args.chunks}  # fmt: skip
        heads = _model(args.model, dtype, "meta").num_heads
        if mode != "dsp" and heads % world:
            res["skipped"] = f"{mode} needs num_heads ({heads}) divisible by the world size {world}"
            lines.append(res)
            if rank == 0:
                print(json.dumps(res), flush=True)
            continue
        for ov in (True, False):
            m = _model(args.model, dtype, device)
            P._install_sequence_parallel(m, dist.group.WORLD, mode, ov, args.chunks)
            models[ov] = (m, P.GradSync(m, dist.group.WORLD) if world > 1 else None)
        inp = _inputs(models[True][0], T, H, W, device, dtype)
        counter.bytes = {"act": 0, "grad": 0}
        _step(models[True][0], inp)
        res["bytes"] = dict(counter.bytes)
        c = models[True][0].config
        pt, ph, pw = c.patch_size
        S = -(-H // ph) * -(-W // pw)
        res["formula_act"] = expected_act_bytes(mode, world, B=1, T=-(-T // pt), S=S, C=c.hidden_size,
                                                cout=c.out_channels * pt * ph * pw, depth=c.depth,
                                                es=torch.tensor([], dtype=dtype).element_size())  # fmt: skip
        res["match"] = res["formula_act"] == res["bytes"]["act"]
        on, off = models[True][0], models[False][0]
        if args.cuda_profile and cuda:
            torch.cuda.profiler.start()
        res["t_on"] = _time(lambda m=on, i=inp: _step(m, i), args.steps, cuda)
        res["t_off"] = _time(lambda m=off, i=inp: _step(m, i), args.steps, cuda)
        counter.noop = True
        res["t_nocomm"] = _time(lambda m=on, i=inp: _step(m, i), args.steps, cuda)
        counter.noop = False
        if args.cuda_profile and cuda:
            torch.cuda.profiler.stop()
        if plain is not None:
            res["t_plain"] = plain
        comm = res["t_off"] - res["t_nocomm"]
        exposed = res["t_on"] - res["t_nocomm"]
        res["comm"], res["exposed"] = comm, exposed
        res["overlap_pct"] = 100 * (comm - exposed) / comm if comm > 0 else None
        for _, sync in models.values():
            if sync is not None:
                sync.remove()
        lines.append(res)
        if rank == 0:
            print(json.dumps(res), flush=True)
    if rank == 0 and args.out:
        with open(args.out, "a") as f:
            for r in lines:
                f.write(json.dumps(r) + "\n")
    counter.uninstall()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo teardown (see NOTES.md)


def test_one_rank_machinery(tmp_path):
    """The suite as pytest collects it: one process on a 1-rank gloo group (what a single GPU measures: the
    overlap machinery's own cost) - every mode runs, counts 0 bytes as the formula says for p = 1, and times
    overlap on / off / without communication."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "parallel.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(MASTER_PORT=str(port), OPENSORA_FAST_BACKEND="reference")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "bench.bench_parallel", "--steps", "1", "--out", str(out)],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["mode"] for r in rows} == {"dsp", "ulysses", "fastseq"}
    for r in rows:
        assert r["match"] and r["bytes"]["act"] == 0 and r["formula_act"] == 0, r
        assert r["t_on"] > 0 and r["t_off"] > 0 and r["t_plain"] > 0, r


if __name__ == "__main__":
    main()

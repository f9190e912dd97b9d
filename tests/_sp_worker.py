"""Run by tests/test_parallel.py under ``torchrun --nproc_per_node P`` (CPU, gloo): a tiny STDiT3 run
sequence-parallel against the same model in one process, forward and backward; rank 0 writes the
errors to the JSON file named by argv[1]. argv[2]: "T,H,W" latent size; argv[3]: "kernels" to run the
Triton kernels (interpreter) instead of the PyTorch reference path; argv[4] (optional): the batch-parallel
size (the batch of 2 split over that many ranks, sequence parallel over the rest); argv[5] (optional): the
sequence-parallel mode (dsp, ulysses, fastseq)."""

import json
import os
import sys

if len(sys.argv) > 3 and sys.argv[3] == "kernels":
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["OPENSORA_FAST_BACKEND"] = "triton"
else:
    os.environ["OPENSORA_FAST_BACKEND"] = "reference"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import opensora_fast.models.stdit3 as M  # noqa: E402
import opensora_fast.parallel as P  # noqa: E402
from opensora_fast.models.stdit3 import STDiT3, STDiT3Config  # noqa: E402
from opensora_fast.parallel import (  # noqa: E402
    all_reduce_grads,
    enable_batch_parallel,
    enable_sequence_parallel,
    parallel_mesh,
)


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    T, H, W = (int(v) for v in sys.argv[2].split(","))
    torch.manual_seed(0)
    cfg = STDiT3Config.tiny(in_channels=4, caption_channels=64, model_max_length=8)
    single = STDiT3(cfg).eval()  # eval: no caption dropout; gradients still flow
    par = STDiT3(cfg).eval()
    par.load_state_dict(single.state_dict())
    bp = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    batch_group, seq_group = parallel_mesh(dist.get_world_size(), bp)
    if batch_group is not None:
        enable_batch_parallel(par, batch_group)
    if seq_group is not None:
        enable_sequence_parallel(par, seq_group, mode=sys.argv[5] if len(sys.argv) > 5 else "dsp")
    calls, bp_calls = [], []
    sp_forward = par._forward_sequence_parallel
    par._forward_sequence_parallel = lambda *a, **k: calls.append(1) or sp_forward(*a, **k)
    bp_forward = M.batch_parallel_forward
    M.batch_parallel_forward = lambda *a, **k: bp_calls.append(1) or bp_forward(*a, **k)
    head_calls = {"seq_to_heads": 0, "all_gather_tokens": 0}  # Ulysses / FastSeq entry points

    def counted(name, fn):
        def f(*a, **k):
            head_calls[name] += 1
            return fn(*a, **k)

        return f

    for name in head_calls:
        setattr(P, name, counted(name, getattr(P, name)))

    g = torch.Generator().manual_seed(1)
    B = 2
    x = torch.randn(B, 4, T, H, W, generator=g, dtype=torch.float32)
    y = torch.randn(B, 1, 8, 64, generator=g, dtype=torch.float32)
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    x_mask = torch.ones(B, T, dtype=torch.bool)
    x_mask[0, 0] = False  # a conditioning frame: the t0 branch
    args = dict(mask=mask, x_mask=x_mask, fps=torch.tensor([24.0, 24.0]), height=torch.tensor([64.0] * 2),
                width=torch.tensor([64.0] * 2))  # fmt: skip
    t = torch.tensor([500.0, 900.0], dtype=torch.float32)
    go = torch.randn(B, 8, T, H, W, generator=g, dtype=torch.float32)

    xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_s = single(xs, t, y, **args)
    out_p = par(xp, t, y, **args)
    (out_s * go).sum().backward()
    (out_p * go).sum().backward()
    all_reduce_grads(par)  # each rank's gradients cover its own tokens / samples: their sum is the whole
    dist.all_reduce(xp.grad)
    grad_err = max(
        (ps.grad - pp.grad).abs().max().item() / (ps.grad.abs().max().item() + 1e-30)
        for ps, pp in zip(single.parameters(), par.parameters())
        if ps.grad is not None
    )
    res = {
        "world": dist.get_world_size(),
        "out_err": (out_s - out_p).abs().max().item(),
        "out_scale": out_s.abs().max().item(),
        "dx_err": (xs.grad - xp.grad).abs().max().item(),
        "grad_rel_err": grad_err,
        "n_grads": sum(p.grad is not None for p in par.parameters()),
        "sp_calls": len(calls),
        "bp_calls": len(bp_calls),
        **head_calls,
    }
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    # skip interpreter finalisation: 1 in 30-40 runs aborted there after a clean destroy (see cli.entry)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

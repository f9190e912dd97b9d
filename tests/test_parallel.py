"""Sequence and batch parallelism (opensora_fast.parallel): STDiT3 run over 2-4 CPU processes (gloo)
equals the same model in one process, outputs and gradients, including uneven splits, an image (T = 1), a
conditioning frame (x_mask), the Triton kernels (interpreter) and a (batch 2 x sequence 2) mesh."""

import json
import os
import subprocess

import pytest
import torch
from _dist import torchrun

from opensora_fast.parallel import SeqLayout, enable_sequence_parallel

WORKER = os.path.join(os.path.dirname(__file__), "_sp_worker.py")


@pytest.mark.parametrize(
    "nproc,size,path,bp,mode",
    [
        (2, "3,6,10", "reference", 1, "dsp"),  # T 3 over 2 ranks (a padded frame), S 15 (a padded position)
        (3, "5,4,6", "reference", 1, "dsp"),  # 3 ranks: T 5 -> 2 + 2 + 1 padded, S 6 -> 2 each
        (2, "1,6,10", "reference", 1, "dsp"),  # an image: rank 1 holds only a padding frame
        (2, "3,6,10", "kernels", 1, "dsp"),  # the Triton kernels under the interpreter
        (2, "3,6,10", "reference", 1, "ulysses"),  # S 15 over 2 ranks: a padded position, cropped for attention
        (2, "3,6,10", "reference", 1, "fastseq"),
        (2, "3,6,10", "reference", 2, "dsp"),  # batch parallel (the CFG pair split): no sequence parallelism
        (4, "3,6,10", "reference", 2, "ulysses"),  # batch 2 x sequence 2
    ],
)
def test_parallel_equals_one_process(tmp_path, nproc, size, path, bp, mode):
    out = tmp_path / "sp.json"
    cmd = torchrun(nproc, WORKER, str(out), size, path, str(bp), mode)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    # the parallel paths ran: batch-parallel once when bp > 1, sequence-parallel when nproc / bp > 1
    assert res["world"] == nproc and res["bp_calls"] == int(bp > 1) and res["sp_calls"] == int(nproc > bp)
    # the tiny STDiT3 has one spatial block: one Ulysses / FastSeq entry in its attention
    assert (res["seq_to_heads"], res["all_gather_tokens"]) == (int(mode == "ulysses"), int(mode == "fastseq"))
    assert res["out_err"] <= 1e-5 * res["out_scale"]
    assert res["dx_err"] <= 1e-5
    assert res["n_grads"] > 40 and res["grad_rel_err"] <= 1e-5  # all-reduced parameter gradients


def test_layout_shapes_and_local_x_mask():
    lay = SeqLayout(T=5, S=7, world=3, rank=2)
    assert (lay.Tp, lay.Sp) == (2, 3)
    x_mask = torch.tensor([[False, True, True, True, False]])
    assert lay.local_x_mask(x_mask).tolist() == [[False, True]]  # frame 4 and one padding frame
    assert SeqLayout(5, 7, 3, 0).local_x_mask(x_mask).tolist() == [[False, True]]
    assert lay.local_x_mask(None) is None


def test_enable_needs_a_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        enable_sequence_parallel(torch.nn.Linear(2, 2))

"""Sequence and CFG parallelism (opensora_fast.parallel), installed from outside with ``parallelize``:
STDiT3 over 2-4 CPU processes (gloo) equals the same model in one process and ``overlap=False``, outputs
and gradients, with uneven splits, an image (T = 1), a conditioning frame (x_mask), the Triton kernels
(interpreter) and a (cfg 2 x seq 2) mesh; schedules recorded with ``record_schedule`` prove the overlap
(independent compute between a collective's issue and its wait, forward and backward); an Open-Sora
module tree built with enable_sequence_parallelism runs under ``apply()`` over 2 and 4 processes; ``shard``
(FSDP2 over a (dp, sp) mesh) does the sequence-parallel gradient sum in its reduce-scatter: one training
step equals one process on the whole batch, with no collective after the backward."""

import ast
import inspect
import json
import os
import subprocess

import pytest
import torch
from _dist import torchrun

from opensora_fast.models import stdit3
from opensora_fast.parallel import SeqLayout, enable_sequence_parallel, parallel_encode, parallelize, shard

WORKER = os.path.join(os.path.dirname(__file__), "_sp_worker.py")


def _run(tmp_path, nproc, size, path, bp, mode):
    out = tmp_path / "sp.json"
    cmd = torchrun(nproc, WORKER, str(out), size, path, str(bp), mode)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == nproc
    return res


def _overlapped(res, prefix):
    """(overlapped, all) collectives whose names start with ``prefix``."""
    names = [n for n in res["overlaps"] if n.startswith(prefix)]
    return [n for n in names if res["overlaps"][n]], names


def _check_schedule(res, mode):
    """Each collective is issued asynchronously and waited on only after independent compute ran, forward
    and backward; only a pipeline's first piece (forward) / last piece (backward) may drain uncovered."""
    ov = res["overlaps"]
    if mode == "dsp":  # the layout switches in 2 pieces each
        for kind in ("dsp.to_tokens", "dsp.to_frames"):
            assert ov[f"{kind}[1]"] and ov[f"{kind}[1].bwd"]
    elif mode == "ulysses":  # q, k, v and output all-to-alls in 2 pieces
        for n in ("qkv_a2a[0]", "qkv_a2a[1]", "out_a2a[0]", "out_a2a[1]"):
            assert ov[f"ulysses.{n}"], n
        for n in ("qkv_a2a[1]", "out_a2a[0]", "out_a2a[1]"):
            assert ov[f"ulysses.{n}.bwd"], n
    else:  # the other ranks' tokens in flight while this rank's are projected; reduce-scatter vs dW
        gathers = [n for n in ov if n.startswith("fastseq.gather")]
        assert gathers and all(ov[n] for n in gathers) and ov["fastseq.reduce_scatter"]
    # the gradient sum ran in buckets during the backward: the last layers' bucket was in flight while
    # earlier blocks' backward ran
    assert res["n_buckets"] > 3 and ov["grad_sync[0]"]


ALL = "dsp,ulysses,fastseq"


@pytest.mark.parametrize(
    "nproc,size,path,bp,modes",
    [
        # T 3 over 2 ranks (a padded frame), S 15 (a padded position, cropped for Ulysses / FastSeq attention)
        (2, "3,6,10", "reference", 1, ALL),
        (3, "5,4,7", "reference", 1, ALL),  # 3 ranks (6 heads): T 5 -> 2 + 2 + 1 padded, S 8 -> 3 + 3 + 2
        (4, "3,6,10", "reference", 1, ALL),  # 4 ranks (4 heads): T 3 -> one frame each and a padding rank
        (2, "1,6,10", "reference", 1, "dsp,ulysses"),  # an image: rank 1 holds only a padding frame (DSP)
        (2, "2,4,6", "kernels", 1, "dsp"),  # the Triton kernels (interpreter) vs one process on the reference
        (2, "3,6,10", "reference", 2, "dsp"),  # CFG parallel (the batch split): no sequence parallelism
        (4, "3,6,10", "reference", 2, ALL),  # cfg 2 x sequence 2
    ],
)
def test_parallel_equals_one_process_and_no_overlap(tmp_path, nproc, size, path, bp, modes):
    out = _run(tmp_path, nproc, size, path, bp, modes)
    assert sorted(out["modes"]) == sorted(modes.split(","))
    for mode, res in out["modes"].items():
        sp = nproc // bp > 1
        tol = 1e-4 if path == "kernels" else 1e-5  # kernels: fp32 kernel vs reference rounding
        assert res["wrapped"] == [sp] * 2 * res["depth"] and res["model_forward_wrapped"] == (bp > 1), mode
        assert res["out_err"] <= tol * res["out_scale"] and res["off_out_err"] <= tol * res["out_scale"], mode
        assert res["off_err"] <= tol * res["out_scale"], mode
        assert res["dx_err"] <= tol and res["off_dx_err"] <= tol, mode
        assert res["n_grads"] > 40 * res["depth"], mode
        assert res["grad_rel_err"] <= tol and res["off_grad_rel_err"] <= tol, mode
        T, H, W = (int(v) for v in size.split(","))
        p = nproc // bp
        h = res["heads"] // p
        pieces = {  # how many pieces the overlapped pipeline has (1: nothing to overlap)
            "dsp": min(-(-T // p), -(-(-(-H // 2) * -(-W // 2)) // p)),
            "ulysses": h if h > 1 or T == 1 else T,
            "fastseq": p,
        }[mode]
        if sp and pieces > 1:
            _check_schedule(res, mode)


@pytest.fixture(scope="module")
def opensora_runs(tmp_path_factory):
    """One torchrun per process count (2, 4), shared by the tests below (one test file per xdist worker):
    the Open-Sora tree over all ranks (sequence parallel 2 / 4), then ``shard`` over a (dp = nproc / 2,
    sp = 2) mesh for our STDiT3 and for the Open-Sora tree (zero2-seq)."""
    cache = {}

    def get(nproc):
        if nproc not in cache:  # S 12: Open-Sora needs S % p == 0
            cache[nproc] = _run(tmp_path_factory.mktemp(f"os{nproc}"), nproc, "3,8,6", "reference", nproc // 2,
                                "opensora,shard")  # fmt: skip
        return cache[nproc]

    return get


@pytest.mark.parametrize("nproc", [2, 4])
def test_apply_opensora_sequence_parallel(opensora_runs, nproc):
    """Open-Sora's inference / zero2-seq set-up: its model built with enable_sequence_parallelism splits the
    tokens itself (over 2 or 4 ranks; 4 heads at 4); after apply() its spatial blocks run Ulysses on our
    kernels; equal to one process."""
    res = opensora_runs(nproc)
    assert res["raw_err"] > 1e-3 * res["out_scale"]  # without apply the spatial attention is local: wrong
    assert res["out_err"] <= 1e-5 * res["out_scale"] and res["dx_err"] <= 1e-5
    assert res["n_grads"] > 40 * res["depth"] and res["grad_rel_err"] <= 1e-5
    assert res["overlaps"]["ulysses.qkv_a2a[1]"]
    # the same tree built plainly (Open-Sora's forward, one block loop): apply() + parallelize() from outside
    for mode, r in res["outside"].items():
        assert r["out_err"] <= 1e-5 * res["out_scale"] and r["dx_err"] <= 1e-5 and r["grad_rel_err"] <= 1e-5, mode


@pytest.mark.parametrize("nproc", [2, 4])
def test_shard_folds_the_sp_gradient_sum_into_fsdp2(opensora_runs, nproc):
    """parallel.shard over (dp 1 x sp 2) and (dp 2 x sp 2) gloo processes, each dp rank on its share of the
    batch: the gradients and one AdamW step equal one process on the whole batch, for our STDiT3 (DSP at
    dp 1, Ulysses at dp 2; gradients summed over sp, averaged over dp: divide factor dp) and for the
    Open-Sora tree of zero2-seq (its forward scales the gradients itself: the mean over all ranks). The
    collectives recorded: the sum is FSDP2's reduce-scatter over all ranks, one per unit, issued during the
    backward; no all-reduce at all after the forward, nothing in the optimizer step."""
    res = opensora_runs(nproc)["shard"]
    dp = nproc // 2
    for which, divide in (("ours", dp), ("opensora", nproc)):
        r = res[which]
        assert (r["dp"], r["sp"], r["divide"]) == (dp, 2, divide), which
        assert r["n_grads"] > 40 * 2 and r["grad_rel_err"] <= 1e-5, which
        # AdamW's first update g / (|g| + eps) moves by at most |dg| / eps (in units of lr), plus rounding
        assert r["step_err"] <= r["grad_abs_err"] / r["eps"] + 1e-3, which
        assert r["world_rs_in_backward"] == r["units"] == 5, which
        assert r["all_reduce_after_forward"] == [] and r["sp_all_reduce"] == [], which
        assert r["step_collectives"] == [], which


def test_vae_split_by_temporal_chunk(tmp_path):
    """57 frames = 4 temporal chunks (17, 17, 17, 6) over 3 ranks (uneven: 2 + 1 + 1): decode and encode
    (posterior means) gathered on rank 0 equal one process; a sampled encode gathered on every rank
    (dst=None) equals one process's ``vae.encode(sample=True)`` from a generator seeded alike, and every
    rank's generator ends in the same state (each rank draws the noise of the chunks it skips)."""
    res = _run(tmp_path, 3, "57,8,8", "reference", 1, "vae")
    assert res["dec_shape"] == [2, 3, 57, 8, 8] and res["enc_shape"][2] == 17  # 3 x 5 + 2 latent frames
    assert res["dec_err"] == 0 and res["enc_err"] == 0
    assert res["sample_err"] == 0 and res["generator_differs"] == 0 and res["sample_minus_mean"] > 1e-3


def test_bench_parallel_bytes_match_the_formula(tmp_path):
    """bench/bench_parallel.py over 2 gloo processes: the bytes counted at the collectives in one training
    step equal NOTES.md's formula for every mode (the timings are not checked: shared CPU)."""
    out = tmp_path / "bench.jsonl"
    cmd = torchrun(2, "-m", "bench.bench_parallel", "--size", "3,8,12", "--steps", "1", "--out", str(out))
    root = os.path.dirname(os.path.dirname(__file__))
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=root, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(v) for v in out.read_text().splitlines()]
    assert [v["mode"] for v in lines] == ["dsp", "ulysses", "fastseq"]
    for v in lines:
        assert v["match"] and v["bytes"]["act"] == v["formula_act"] > 0 and v["bytes"]["grad"] > 0, v
        assert v["t_on"] > 0 and v["t_off"] > 0 and v["t_nocomm"] > 0


def test_layout_shapes_and_local_x_mask():
    lay = SeqLayout(T=5, S=7, world=3, rank=2)
    assert (lay.Tp, lay.Sp) == (2, 3)
    x_mask = torch.tensor([[False, True, True, True, False]])
    assert lay.local_x_mask(x_mask).tolist() == [[False, True]]  # frame 4 and one padding frame
    assert SeqLayout(5, 7, 3, 0).local_x_mask(x_mask).tolist() == [[False, True]]
    assert lay.local_x_mask(None) is None


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        enable_sequence_parallel(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        shard(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        parallelize(torch.nn.Linear(2, 2))


def test_no_parallel_code_in_the_model():
    """STDiT3.forward has one block loop and nothing of ranks or groups; the config no longer refuses
    enable_sequence_parallelism (parallelism is installed from outside)."""
    src = inspect.getsource(stdit3)
    for word in ("torch.distributed", "sp_group", "bp_group", "SeqLayout", "getattr(self"):
        assert word not in src, word
    fwd = ast.parse(inspect.getsource(stdit3.STDiT3.forward).strip().replace("\n    ", "\n"))
    loops = [n for n in ast.walk(fwd) if isinstance(n, ast.For) and "blocks" in ast.unparse(n.iter)]
    assert len(loops) == 1
    stdit3.STDiT3Config.tiny(enable_sequence_parallelism=True)


@pytest.fixture
def one_rank_group():
    """A 1-process gloo group in this process (destroyed after the test)."""
    import torch.distributed as dist
    from _dist import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_bad_arguments_raise_value_error(one_rank_group, reference_backend):
    from _opensora_like import STDiT3 as OSSTDiT3

    from opensora_fast.parallel import GradSync

    model = stdit3.STDiT3(stdit3.STDiT3Config.tiny())
    with pytest.raises(ValueError, match="sp_mode"):
        parallelize(model, sp_mode="ring")
    with pytest.raises(ValueError, match="chunks"):
        parallelize(model, chunks=0)
    with pytest.raises(ValueError, match="cfg_parallel"):
        parallelize(model, one_rank_group, cfg_parallel=True)
    with pytest.raises(ValueError, match="enable_sequence_parallelism"):
        parallelize(OSSTDiT3(enable_sequence_parallelism=True))
    with pytest.raises(ValueError, match="bucket_mb"):
        GradSync(model, bucket_mb=0)
    with pytest.raises(ValueError, match="dp_size x sp_size"):
        shard(model, sp_size=2)
    with pytest.raises(ValueError, match="sp_size"):
        shard(model, sp_size=0)
    with pytest.raises(ValueError, match="mode"):
        shard(model, mode="zero1")
    with pytest.raises(ValueError, match="model"):
        shard(torch.nn.Linear(2, 2))
    from test_vae import tiny_vae

    with pytest.raises(ValueError, match="dst"):
        parallel_encode(tiny_vae(), torch.zeros(1, 3, 2, 8, 8), dst=1)
    assert parallelize(model) is model and "forward" not in model.spatial_blocks[0].__dict__  # world 1: nothing


@pytest.mark.parametrize("mode", ["dsp", "ulysses", "fastseq"])
def test_strategy_on_one_rank_equals_plain_model(one_rank_group, reference_backend, mode):
    """The overlap machinery on a 1-rank group (what bench_parallel times on one GPU): same outputs and
    gradients as the plain model; GradSync with accumulation (enabled on the last backward only)."""
    from opensora_fast import parallel as P

    torch.manual_seed(0)
    cfg = stdit3.STDiT3Config.tiny(depth=2)
    plain, par = stdit3.STDiT3(cfg).eval(), stdit3.STDiT3(cfg).eval()
    par.load_state_dict(plain.state_dict())
    P._install_sequence_parallel(par, one_rank_group, mode, True, 2)
    sync = P.GradSync(par, one_rank_group, bucket_mb=0.01)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 6, 10, generator=g)
    y = torch.randn(2, 1, 8, 64, generator=g)
    kw = dict(mask=torch.tensor([[1] * 5 + [0] * 3, [1] * 8]), x_mask=torch.tensor([[False, True, True]] * 2),
              fps=torch.tensor([24.0]), height=torch.tensor([64.0]), width=torch.tensor([64.0]))  # fmt: skip
    t = torch.tensor([500.0, 900.0])
    for m in (plain, par):
        for i in range(2):  # two accumulated backwards
            sync.enabled = i == 1
            m(x, t, y, **kw).square().mean().backward()
    torch.testing.assert_close(par(x, t, y, **kw), plain(x, t, y, **kw), rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(plain.named_parameters(), par.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=n)
    sync.remove()

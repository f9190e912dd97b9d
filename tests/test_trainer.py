"""The shared trainer (opensora_fast.trainer) on a toy regression task: exact resume through TrainState and its
checkpoints (EMA, fp16 scaler, data position), state_dict round trip, keep-last, the NaN stop, DDP in a one-process
gloo group, and VAE checkpoints written before the trainer (optimizer state keyed by position) still resuming."""

import os

import pytest
import torch
import torch.distributed as dist
from _dist import free_port

from opensora_fast import trainer
from opensora_fast.parallel import shard


class Toy(trainer.Task):
    """Linear regression on fresh seeded data: batches drawn per step from a seeded permutation, noise on the
    targets from the step seed, ``accum`` micro-batches per step."""

    def __init__(self, seed=0, n=24, batch=6, accum=1, nan_at=None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 3, generator=g)
        self.n, self.batch, self.accum, self.nan_at = n, batch, accum, nan_at
        self.written = []

    def batches(self, start):
        def gen(k):
            while True:
                yield torch.randperm(self.n, generator=torch.Generator().manual_seed(1000 + k))[: self.batch]
                k += 1

        return gen(start)

    def step_seed(self, step, dp_rank):
        return 7 * step + dp_rank

    def plan(self, step, idx, seed, model):
        x, y = self.x[idx], self.y[idx]
        noise = 0.1 * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
        chunks = trainer.micro_batches(len(idx), self.accum)

        def micro(sl):
            def loss():
                value = (model(x[sl]) - y[sl] - noise[sl]).square().mean() * ((sl.stop - sl.start) / len(idx))
                if step == self.nan_at:
                    value = value * float("nan")
                return value, {"mse": float(value.detach())}

            return loss

        return trainer.StepPlan([micro(sl) for sl in chunks], samples=len(idx), record={"rows": len(idx)})

    def write_model(self, directory, state):
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"))
        self.written.append(directory)


def opts(**kw):
    base = dict(name="Toy", steps=6, seed=3, lr_at=lambda s: 0.05 * min(1.0, (s + 1) / 3), grad_clip=1.0,
                ema_decay=0.9, dtype="fp16", ckpt_every=2, log_every=100)  # fmt: skip
    return trainer.TrainerOptions(**{**base, **kw})


def model(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 3)


def fit(o, task, m, resume=None, **kw):
    return trainer.Trainer(o, task, m, device="cpu", progress=False, **kw).fit(resume)


def test_resume_from_a_checkpoint_repeats_the_straight_run(tmp_path):
    straight = fit(opts(), Toy(), model(1))
    ck = str(tmp_path / "ck")
    first = fit(opts(steps=3, keep_last=2), Toy(), model(1), ckpt_dir=ck, log_path=str(tmp_path / "log.jsonl"))
    assert sorted(os.listdir(ck)) == ["latest", "step-00000002", "step-00000003"]
    resumed = fit(opts(keep_last=2), Toy(), model(99), ckpt_dir=ck, resume="auto", log_path=str(tmp_path / "log.jsonl"))
    assert resumed.step == 6 and len(resumed.losses) == 3
    assert first.losses + resumed.losses == straight.losses  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters()))
    assert all(torch.equal(straight.ema[n], resumed.ema[n]) for n in straight.ema)
    assert sorted(os.listdir(ck)) == ["latest", "step-00000004", "step-00000006"]  # keep_last 2
    state = torch.load(os.path.join(ck, "step-00000006", "train_state.pt"), weights_only=True)
    assert state["step"] == 6 and state["data"] == {"batches": 6} and state["seed"] == 3
    assert state["scaler"]["scale"] == 65536.0 and set(state["optimizer"]["state"]) == {"weight", "bias"}
    assert os.path.isfile(os.path.join(ck, "step-00000006", "ema", "model.safetensors"))
    lines = open(tmp_path / "log.jsonl").read().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == [1, 2, 3, 4, 5, 6]
    assert resumed.records[-1]["rows"] == 6 and "mse" in resumed.records[-1]


def test_train_state_dict_round_trip():
    a = trainer.Trainer(opts(), Toy(), model(1), device="cpu", progress=False)
    a.build()
    for step in range(3):
        a.train_step(step, next(Toy().batches(step)))
    sd = a.state.state_dict()
    b = trainer.Trainer(opts(), Toy(), model(5), device="cpu", progress=False)
    b.build()
    b.state.load_state_dict(sd)
    sd2 = b.state.state_dict()
    assert (sd2["step"], sd2["seed"], sd2["data"]) == (3, 3, {"batches": 3})
    for key in ("model", "ema"):
        assert all(torch.equal(sd[key][k], sd2[key][k]) for k in sd[key])
    for name, s in sd["optimizer"]["state"].items():
        assert all(
            torch.equal(torch.as_tensor(v), torch.as_tensor(sd2["optimizer"]["state"][name][k])) for k, v in s.items()
        )
    assert sd2["scaler"] == sd["scaler"]
    assert not torch.equal(model(5).weight, b.state.model.weight)  # the weights did come from the state
    la, _, _, _, _, _ = a.train_step(3, next(Toy().batches(3)))
    lb, _, _, _, _, _ = b.train_step(3, next(Toy().batches(3)))
    assert torch.equal(la, lb)


def test_grad_accumulation_follows_the_larger_batch():
    one = fit(opts(dtype="fp32"), Toy(), model(1))
    two = fit(opts(dtype="fp32"), Toy(accum=3), model(1))
    assert two.losses == pytest.approx(one.losses, rel=1e-6)
    torch.testing.assert_close(two.model.weight, one.model.weight, rtol=1e-5, atol=1e-6)


def test_a_nan_loss_stops_training_naming_the_step():
    with pytest.raises(FloatingPointError, match=r"Toy loss is nan at step 2 \(\{'mse': nan\}\)"):
        fit(opts(), Toy(nan_at=2), model(1))
    with pytest.raises(RuntimeError, match="needs a process group"):
        trainer.Trainer(opts(), Toy(), model(1), device="cpu", parallel="ddp")
    with pytest.raises(ValueError, match="parallel must be one of"):
        trainer.Trainer(opts(), Toy(), model(1), device="cpu", parallel="zero")


def test_ddp_in_a_one_process_gloo_group_matches_the_plain_run(tmp_path):
    plain = fit(opts(dtype="fp32"), Toy(accum=2), model(1))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ddp = fit(opts(dtype="fp32"), Toy(accum=2), model(1), parallel="ddp", ckpt_dir=str(tmp_path / "c"))
        # an optimizer state keyed by position (VAE checkpoints before the trainer) also loads into FSDP2
        plain_opt = torch.optim.AdamW(plain.model.parameters())
        plain.model(torch.randn(4, 8)).square().sum().backward()
        plain_opt.step()
        sharded = model(2)
        shard(sharded, units=[])  # FSDP2, the whole model one unit
        opt = torch.optim.AdamW(sharded.parameters())
        trainer.load_optimizer_state(sharded, opt, plain_opt.state_dict())
        got = trainer.optimizer_state(sharded, opt)["state"]
        assert torch.equal(got["weight"]["exp_avg"], plain_opt.state_dict()["state"][0]["exp_avg"])
    finally:
        dist.destroy_process_group()
    assert ddp.losses == pytest.approx(plain.losses, rel=1e-6)
    assert isinstance(ddp.model, torch.nn.Linear)  # the module inside the DDP wrapper
    resumed = fit(opts(dtype="fp32", steps=6), Toy(accum=2), model(3), resume=str(tmp_path / "c" / "step-00000004"))
    assert resumed.losses == pytest.approx(plain.losses[4:], rel=1e-6)


def test_a_vae_checkpoint_from_before_the_trainer_still_resumes_exactly(tmp_path):
    """Before the shared trainer the VAE saved ``optimizer.state_dict()`` (keyed by position) and no seed / data
    position; such a checkpoint resumes to the same losses as the straight run."""
    from opensora_fast.configs import vae as cv
    from test_vae_train import smooth_clips

    from opensora_fast import vae_train as vt
    from opensora_fast.checkpoint import write_checksums

    cfg = cv.tiny(3, ckpt_every=2)
    clips = smooth_clips(3, 5, 8, 8, seed=4)
    straight = vt.train_vae(cfg, clips, steps=3, progress=False)
    first = vt.train_vae(cfg, clips, steps=2, ckpt_dir=str(tmp_path / "ck"), progress=False)
    path = os.path.join(first.checkpoint, "train_state.pt")
    new = torch.load(path, weights_only=True)
    order = [n for n, p in first.model.named_parameters() if p.requires_grad]
    old_opt = {"state": {order.index(n): s for n, s in new["optimizer"]["state"].items()},
               "param_groups": [{**g, "params": [order.index(n) for n in g["params"]]}
                                for g in new["optimizer"]["param_groups"]]}  # fmt: skip
    torch.save({"step": 2, "optimizer": old_opt}, path)
    os.remove(os.path.join(first.checkpoint, "checksums.json"))
    write_checksums(first.checkpoint)
    resumed = vt.train_vae(cfg, clips, steps=3, resume=first.checkpoint, progress=False)
    assert first.losses + resumed.losses == straight.losses
    m = vt.build_model(cfg, "cpu")
    o = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1.0)
    assert vt.load_checkpoint(first.checkpoint, m, o) == 2 and o.param_groups[0]["lr"] == cfg.lr
    state = o.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], old_opt["state"][i]["exp_avg"]) for i in old_opt["state"])

"""The one training loop of ``opensora-fast``, shared by the STDiT3 (``train.train_dit``) and the VAE
(``vae_train.train_vae``), in the manner of torchtitan's trainer.

A program hands the ``Trainer`` its model, a ``Task`` (its batches, its loss for a batch as micro-batch closures,
its checkpoint files) and ``TrainerOptions``; the trainer owns everything else:

- ``TrainState``: model, EMA, optimizer, gradient scaler, step, data position and the seed of the step seeds,
  with ``state_dict()`` (full tensors, the same with and without DDP / FSDP2; collective under a process group)
  and ``load_state_dict()``;
- one step (``Trainer.train_step``): the learning rate of the step, the micro-batches (gradient accumulation;
  the gradient reduction of DDP / FSDP2 only after the last), autocast, the fp16 gradient scaler, a NaN / inf
  loss stops training naming the step, gradient clipping, the optimizer step (skipped by the scaler on
  overflow), the EMA update, the loss averaged over the ranks;
- one checkpoint cadence (every ``ckpt_every`` steps and at the end) through ``opensora_fast.checkpoint``:
  ``step-XXXXXXXX/`` written atomically with checksums (verified on load), ``latest``, keep-last; a
  checkpoint holds ``model.safetensors`` + ``config.json`` (the task writes them), ``ema/`` (with an EMA),
  ``train_state.pt`` (step, optimizer, scaler, data position, seed; ``weights_only`` loadable) and ``run.json``;
- one logging path: a tqdm bar, a line every ``log_every`` steps, ``log.jsonl`` (truncated to the resumed
  step) and TensorBoard scalars beside it when tensorboard is installed;
- one result type, ``TrainResult``.

Every step's randomness comes from ``Task.step_seed(step, dp_rank)`` and the batches from the task's seeded
order, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from opensora_fast.checkpoint import (
    CheckpointError,
    has_checkpoint,
    load_safetensors_checked,
    load_torch_checked,
    recover,
    resolve_resume,
    verify_checkpoint,
    write_step_dir,
)
from opensora_fast.common import tensorboard_writer

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
PARALLEL = ("none", "ddp", "fsdp")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 DTensor (a plain tensor as it is)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def step_seed(seed: int, step: int, rank: int) -> int:
    """The STDiT3's seed of one step's draws on data-parallel rank ``rank``."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63)


def micro_batches(B: int, n: int) -> list[slice]:
    """``B`` samples in ``n`` consecutive slices as equal as possible (empty ones dropped)."""
    edges = [round(k * B / n) for k in range(n + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards the module in place: itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# state: full tensors, the same layout with and without DDP / FSDP2


def _dcp_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=is_dist(), **kw)


def model_state(model) -> dict:
    """The model's state dict, full tensors on the CPU (gathered from the shards under FSDP2: collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_dcp_options(cpu_offload=is_dist()))
    return {k: full_tensor(v).detach().cpu() for k, v in sd.items()}


def load_model_state(model, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_dcp_options())


def optimizer_state(model, optimizer) -> dict:
    """Optimizer state keyed by parameter name, full tensors (the same layout with and without FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_dcp_options(cpu_offload=is_dist()))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load a state from ``optimizer_state``, or one keyed by position (``optimizer.state_dict()``, as the VAE's
    checkpoints held before the shared trainer), converted to names first."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, _by_name(model, optimizer, state), options=_dcp_options())


def _by_name(model, optimizer, state: dict) -> dict:
    groups = state.get("param_groups", [])
    if not groups or all(isinstance(p, str) for g in groups for p in g["params"]):
        return state
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    ids = {}
    for g_old, g in zip(groups, optimizer.param_groups):
        if len(g_old["params"]) != len(g["params"]):
            raise CheckpointError(
                f"optimizer state holds {len(g_old['params'])} parameters, this model trains {len(g['params'])}"
            )
        ids.update({i: names[id(p)] for i, p in zip(g_old["params"], g["params"])})
    return {
        "state": {ids[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [ids[i] for i in g["params"]]} for g in groups],
    }


def init_ema(model) -> dict:
    """fp32 copies of the trainable parameters (sharded like them under FSDP)."""
    return {n: p.detach().float().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


@torch.no_grad()
def update_ema(ema: dict, model, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * param, for the trainable parameters (Open-Sora's update_ema)."""
    for n, p in unwrap(model).named_parameters():
        if n in ema:
            ema[n].mul_(decay).add_(p.detach().float(), alpha=1 - decay)


def ema_state(ema: dict, full_model_state: dict) -> dict:
    """The model's state dict with the EMA values for the trainable parameters."""
    return {**full_model_state, **{n: full_tensor(v).detach().cpu() for n, v in ema.items()}}


def load_ema(ema: dict, state: dict) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    for n, v in ema.items():
        src = state[n].to(device=v.device, dtype=v.dtype)
        if isinstance(v, DTensor):
            v.copy_(distribute_tensor(src, v.device_mesh, v.placements))
        else:
            v.copy_(src)


class TrainState:
    """What a checkpoint restores: the (wrapped) model, its EMA (None: no EMA), the optimizer, the gradient scaler,
    the step, the data position (batches consumed) and the seed the step seeds derive from."""

    def __init__(self, model, optimizer, scaler, ema: dict | None, seed: int, step: int = 0):
        self.model, self.optimizer, self.scaler, self.ema, self.seed = model, optimizer, scaler, ema, seed
        self.step = step
        self.batches = step  # one batch (per rank) per step

    def state_dict(self) -> dict:
        """Full tensors on the CPU; collective under a process group (every rank calls it)."""
        msd = model_state(self.model)
        return {
            "step": self.step,
            "seed": self.seed,
            "data": {"batches": self.batches},
            "model": msd,
            "ema": None if self.ema is None else ema_state(self.ema, msd),
            "optimizer": optimizer_state(self.model, self.optimizer),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def load_state_dict(self, sd: dict) -> None:
        """The inverse of ``state_dict`` (also what ``read_checkpoint`` returns). A checkpoint without EMA weights
        for a run with an EMA, or a different seed, is said on stderr (the EMA starts from the weights; the
        draws after the resumed step differ from the first run's)."""
        load_model_state(self.model, sd["model"])
        if self.ema is not None:
            if sd.get("ema") is None:
                print("resume: the checkpoint holds no EMA weights; the EMA starts from the weights", file=sys.stderr)
                load_ema(self.ema, sd["model"])
            else:
                load_ema(self.ema, sd["ema"])
        load_optimizer_state(self.model, self.optimizer, sd["optimizer"])
        if sd.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(sd["scaler"])
        if sd.get("seed") is not None and sd["seed"] != self.seed:
            print(
                f"warning: the checkpoint was trained with seed {sd['seed']}, this run uses {self.seed}: the steps "
                "from here on draw other noise and batches than the first run would have",
                file=sys.stderr,
            )
        self.step = int(sd["step"])
        self.batches = int((sd.get("data") or {}).get("batches", self.step))


# ---------------------------------------------------------------------------------------------
# checkpoints: step-XXXXXXXX/{model.safetensors, config.json, ema/, train_state.pt, run.json}


def write_checkpoint(
    ckpt_dir: str,
    sd: dict,
    write_model: Callable[[str, dict], None],
    run: dict | None = None,
    keep_last: int | None = None,
) -> str:
    """Write ``sd`` (``TrainState.state_dict()``) as ``ckpt_dir/step-XXXXXXXX`` (atomically, with checksums,
    ``latest`` pointed at it, the newest ``keep_last`` kept): ``write_model(dir, state_dict)`` writes the weights
    (and ema/ the EMA weights the same way), ``train_state.pt`` the rest, ``run.json`` the run's options."""

    def write(tmp: str) -> None:
        write_model(tmp, sd["model"])
        if sd.get("ema") is not None:
            write_model(os.path.join(tmp, "ema"), sd["ema"])
        state = {"step": sd["step"], "optimizer": sd["optimizer"], "seed": sd.get("seed"), "data": sd.get("data")}
        if sd.get("scaler") is not None:
            state["scaler"] = sd["scaler"]
        torch.save(state, os.path.join(tmp, "train_state.pt"))
        if run is not None:
            with open(os.path.join(tmp, "run.json"), "w") as f:
                json.dump(run, f, indent=1, default=str)

    return write_step_dir(ckpt_dir, int(sd["step"]), write, keep_last=keep_last)


def read_checkpoint(path: str, ema: bool = False) -> dict:
    """A checkpoint directory, checksums verified, as ``TrainState.load_state_dict`` takes it, plus "path",
    "train_state" (the file's dict) and "run" (run.json or None). ``ema``: ``ema/model.safetensors`` must be there
    (else "ema" is None when it is absent). Missing, corrupt or unreadable files raise CheckpointError naming
    them."""
    verify_checkpoint(path)
    model_sd = load_safetensors_checked(os.path.join(path, "model.safetensors"))
    ema_path = os.path.join(path, "ema", "model.safetensors")
    ema_sd = load_safetensors_checked(ema_path) if ema or os.path.exists(ema_path) else None
    ts_path = os.path.join(path, "train_state.pt")
    ts = load_torch_checked(ts_path)
    if not isinstance(ts, dict) or "step" not in ts or "optimizer" not in ts:
        raise CheckpointError(f"checkpoint file {ts_path!r} holds no step / optimizer")
    run = None
    if os.path.isfile(os.path.join(path, "run.json")):
        with open(os.path.join(path, "run.json")) as f:
            run = json.load(f)
    return {
        "path": path,
        "step": int(ts["step"]),
        "model": model_sd,
        "ema": ema_sd,
        "optimizer": ts["optimizer"],
        "scaler": ts.get("scaler"),
        "seed": ts.get("seed"),
        "data": ts.get("data"),
        "train_state": ts,
        "run": run,
    }


# ---------------------------------------------------------------------------------------------
# logging


def truncate_log(path: str, step: int) -> None:
    """Drop records after ``step`` (steps a crashed run logged after its last checkpoint). A last line
    without its newline was torn by a kill mid-write and is dropped; any other line that is not a JSON
    record with a "step" is a ValueError naming the file and line."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline, else a record cut short
    if torn.strip():
        print(f"{path}: dropping a torn last line ({len(torn)} bytes, written when the run was killed)")
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            s = int(rec["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path} line {n} is not a log record ({type(e).__name__}: {e}); fix or remove that line to resume"
            ) from None
        if s <= step:
            keep.append(line + b"\n")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class _Log:
    """``log.jsonl`` (one record per step) and TensorBoard scalars in ``tb/`` beside it (rank 0 only)."""

    def __init__(self, path: str | None, start: int, prefix: str, writer_factory):
        self.f = self.tb = None
        self.prefix = prefix
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            truncate_log(path, start)
            self.f = open(path, "a")
            if writer_factory is not None:
                self.tb = writer_factory(os.path.join(os.path.dirname(os.path.abspath(path)), "tb"))

    def write(self, rec: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{self.prefix}/{k}", v, rec["step"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------
# the trainer


@dataclass
class StepPlan:
    """A task's step: ``micro`` closures, each returning (its loss, weighted so that their sum is the step's loss;
    logged parts, weighted the same), run in order with a backward after each."""

    micro: list[Callable[[], tuple[torch.Tensor, dict]]]
    record: dict = field(default_factory=dict)  # logged with the step (shape, batch size, ...)
    samples: int = 0  # per data-parallel rank, for samples_per_s
    postfix: dict = field(default_factory=dict)  # the progress bar's extras
    finish: Callable[[dict, float], None] | None = None  # adds fields from the step's time (rec, seconds)


class Task:
    """What a program supplies: its data, its loss and its checkpoint files. Methods not overridden do nothing."""

    def batches(self, start: int) -> Iterator:
        """This rank's batches from step ``start`` on (the ones before skipped: the data position)."""
        raise NotImplementedError

    def step_seed(self, step: int, dp_rank: int) -> int:
        raise NotImplementedError

    def plan(self, step: int, batch, seed: int, model) -> StepPlan:
        """The step's micro-batches on ``batch`` with draws from ``seed``; ``model`` is the wrapped model."""
        raise NotImplementedError

    def setup(self, model, params: list) -> None:
        """After the model is wrapped, before the optimizer is built: ``model`` (wrapped), its trainable ``params``."""

    def check_model(self, model, state: dict, path: str) -> None:
        """Raise a one-line error when a checkpoint's weights do not fit ``model`` (unwrapped)."""

    def write_model(self, directory: str, state: dict) -> None:
        """Write a full state dict as the program's weight files (``model.safetensors`` + ``config.json``)."""
        raise NotImplementedError

    def read_checkpoint(self, path: str) -> dict:
        return read_checkpoint(path)

    def after_backward(self) -> None:
        """After the last micro-batch's backward, before clipping (e.g. a sequence-parallel gradient sum)."""

    def before_micro(self, m: int, n: int) -> None:
        """Before micro-batch ``m`` of ``n``."""

    def after_step(self, step: int, rec: dict, model) -> None:
        """Add to the step's log record (evaluation, counters)."""

    def describe(self, rec: dict) -> str:
        """The end of the printed log line."""
        return ""

    def close(self) -> None:
        """Release the data pipeline."""


@dataclass
class TrainerOptions:
    name: str  # progress bar and error messages ("STDiT3", "VAE stage 3")
    steps: int  # train until this step, in total
    seed: int
    lr_at: Callable[[int], float]
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema_decay: float | None = None  # None: no EMA
    dtype: str = "fp32"  # autocast on CUDA; "fp16" adds a gradient scaler (also on the CPU, where the step is fp32)
    ckpt_every: int = 1000
    keep_last: int | None = None
    log_every: int = 10
    tb_prefix: str = "train"


@dataclass
class TrainResult:
    losses: list[float]  # one per step run in this call (mean over ranks)
    step: int  # steps done in total, including those before a resume
    checkpoint: str | None  # the last checkpoint written (or resumed from)
    model: torch.nn.Module  # the trained model (FSDP2: sharded in place; DDP: the module inside)
    ema: dict | None = None  # the EMA of the trainable parameters (None: no EMA)
    records: list[dict] = field(default_factory=list)  # the log record of each step run


class Trainer:
    """Trains ``model`` (unwrapped, on ``device``) with ``task`` until ``opts.steps``.

    ``parallel``: "none", "ddp" (DistributedDataParallel over every rank) or "fsdp" (FSDP2 through
    ``parallel.shard`` with ``fsdp_units``, ``fsdp_mode``, ``mp_policy`` over the (dp, sp_size) mesh: its
    reduce-scatter also sums the gradients over a sequence-parallel group); ``rank`` / ``world``: this process in
    the job, ``dp_rank`` / ``dp``: in the data-parallel dimension. ``ckpt_dir``: checkpoints; ``run_meta``: saved as
    ``run.json``; ``log_path``: ``log.jsonl`` (rank 0). ``on_step(step, rec)`` after each step. ``ema_update``
    and ``tensorboard`` (a SummaryWriter factory, or None) default to this module's."""

    def __init__(
        self,
        opts: TrainerOptions,
        task: Task,
        model: torch.nn.Module,
        *,
        device,
        rank: int = 0,
        world: int = 1,
        dp_rank: int = 0,
        dp: int = 1,
        parallel: str = "none",
        fsdp_units=(),
        fsdp_mode: str = "zero2",
        sp_size: int = 1,
        mp_policy=None,
        ckpt_dir: str | None = None,
        run_meta: dict | None = None,
        log_path: str | None = None,
        progress: bool = True,
        on_step: Callable[[int, dict], None] | None = None,
        ema_update: Callable = update_ema,
        tensorboard: Callable[[str], Any] | None = tensorboard_writer,
    ):
        if parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
        if parallel != "none" and not is_dist():
            raise RuntimeError(f"parallel={parallel!r} needs a process group (run under torchrun, or init one first)")
        if opts.dtype not in PRECISIONS:
            raise ValueError(f"dtype must be 'bf16', 'fp16' or 'fp32', got {opts.dtype!r}")
        self.opts, self.task, self.inner = opts, task, model
        self.device = torch.device(device)
        self.rank, self.world, self.dp_rank, self.dp = rank, world, dp_rank, dp
        self.parallel, self.fsdp_units, self.fsdp_mode = parallel, fsdp_units, fsdp_mode
        self.sp_size, self.mp_policy = sp_size, mp_policy
        self.ckpt_dir, self.run_meta, self.log_path = ckpt_dir, run_meta, log_path
        self.progress, self.on_step = progress, on_step
        self.ema_update, self.tensorboard = ema_update, tensorboard
        self.amp = PRECISIONS[opts.dtype]
        self.use_amp = self.device.type == "cuda" and self.amp is not None
        self.state: TrainState | None = None
        self.last_checkpoint: str | None = None

    # ------------------------------------------------------------------ set-up

    def _wrap(self, model):
        if self.parallel == "fsdp":
            from opensora_fast.parallel import shard

            shard(model, sp_size=self.sp_size, dp_size=self.dp, mode=self.fsdp_mode, mp_policy=self.mp_policy,
                  device=self.device.type, units=self.fsdp_units)  # fmt: skip
            return model
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        return model

    def resolve(self, resume) -> dict | None:
        """The checkpoint to resume from (``recover`` first): a path, a ``ckpt_dir``, "auto" (``ckpt_dir`` when it
        has one) or what ``read_checkpoint`` returned."""
        if self.ckpt_dir and self.rank == 0:
            for line in recover(self.ckpt_dir):
                print(f"checkpoints: {line}")
        if is_dist():
            dist.barrier()
        if resume == "auto":
            resume = self.ckpt_dir if self.ckpt_dir and has_checkpoint(self.ckpt_dir) else None
        if not resume:
            return None
        return resume if isinstance(resume, dict) else self.task.read_checkpoint(resolve_resume(resume))

    def build(self, resume=None) -> TrainState:
        """Wrap the model, build EMA / optimizer / scaler, and load the checkpoint (``resolve``'s argument)."""
        o = self.opts
        ck = self.resolve(resume)
        if ck is not None:
            self.task.check_model(self.inner, ck["model"], ck["path"])
            self.last_checkpoint = ck.get("path")
        start = ck["step"] if ck is not None else 0
        model = self._wrap(self.inner)
        ema = init_ema(model) if o.ema_decay is not None else None
        params = [p for p in model.parameters() if p.requires_grad]
        self.task.setup(model, params)
        optimizer = torch.optim.AdamW(
            params, lr=o.lr_at(start), eps=o.adam_eps, weight_decay=o.weight_decay, fused=self.device.type == "cuda"
        )
        scaler = torch.amp.GradScaler(self.device.type, enabled=o.dtype == "fp16")
        self.state = TrainState(model, optimizer, scaler, ema, o.seed)
        self.params = params
        if ck is not None:
            self.state.load_state_dict(ck)
        return self.state

    # ------------------------------------------------------------------ one step

    def train_step(self, step: int, batch) -> tuple[torch.Tensor, dict, dict, StepPlan, bool, float | None]:
        """One optimizer step on ``batch``: (mean loss over the ranks, its logged parts, grad norm, the plan,
        skipped by the scaler, the loss scale before the step or None)."""
        o, st, task = self.opts, self.state, self.task
        model, optimizer, scaler = st.model, st.optimizer, st.scaler
        for grp in optimizer.param_groups:
            grp["lr"] = o.lr_at(step)
        plan = task.plan(step, batch, task.step_seed(step, self.dp_rank), model)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        parts: dict[str, float] = {}
        n = len(plan.micro)
        for m, micro in enumerate(plan.micro):
            last = m == n - 1
            if self.parallel == "fsdp" and n > 1:  # reduce-scatter the gradients once, after the last batch
                model.set_requires_gradient_sync(last)
            task.before_micro(m, n)
            sync = model.no_sync() if self.parallel == "ddp" and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.use_amp):
                    part, logged = micro()
                v = part.item()
                if not math.isfinite(v):
                    raise FloatingPointError(
                        f"{o.name} loss is {v} at step {step}" + (f" ({logged})" if logged else "")
                    )
                scaler.scale(part).backward()
            loss = loss + part.detach()
            for k, x in logged.items():
                parts[k] = parts.get(k, 0.0) + x
        task.after_backward()
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.unscale_(optimizer)
        gn = torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip if o.grad_clip else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        skipped = scale is not None and scaler.get_scale() < scale  # fp16 overflow: no update this step
        if not skipped and st.ema is not None:
            self.ema_update(st.ema, model, o.ema_decay)
        if is_dist():
            both = torch.stack([loss.detach(), *[torch.tensor(v, device=self.device) for v in parts.values()]])
            dist.all_reduce(both)
            both = both / self.world
            loss, parts = both[0], dict(zip(parts, both[1:].tolist()))
        st.step = step + 1
        st.batches = step + 1
        return loss, parts, gn, plan, skipped, scale

    # ------------------------------------------------------------------ the loop

    def save(self) -> str:
        """Checkpoint the current state (every rank calls this: gathering the shards is collective)."""
        sd = self.state.state_dict()
        final = os.path.join(self.ckpt_dir, f"step-{self.state.step:08d}")
        if self.rank == 0:
            write_checkpoint(self.ckpt_dir, sd, self.task.write_model, self.run_meta, self.opts.keep_last)
        if is_dist():
            dist.barrier()
        return final

    def fit(self, resume=None) -> TrainResult:
        """Build (``resume``: see ``resolve``), then train until ``opts.steps``."""
        o = self.opts
        st = self.build(resume)
        start = st.step
        batches = self.task.batches(start)
        log = _Log(self.log_path, start, o.tb_prefix, self.tensorboard) if self.rank == 0 else None
        losses, records = [], []
        bar = tqdm(range(start, o.steps), initial=start, total=o.steps, desc=o.name,
                   disable=not self.progress or self.rank)  # fmt: skip
        try:
            for step in bar:
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:  # a finite iterable of batches ran out
                    break
                data_s = time.perf_counter() - t0
                loss, parts, gn, plan, skipped, scale = self.train_step(step, batch)
                dt = time.perf_counter() - t0
                rec = {"step": step + 1, "loss": float(loss), **parts, "lr": o.lr_at(step),
                       "grad_norm": float(full_tensor(gn)), "samples_per_s": plan.samples * self.dp / dt,
                       "data_s": data_s, **plan.record}  # fmt: skip
                if plan.finish is not None:
                    plan.finish(rec, dt)
                self.task.after_step(step, rec, st.model)
                if scale is not None:
                    rec["loss_scale"] = scale
                    rec["skipped"] = bool(skipped)
                losses.append(rec["loss"])
                records.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4g}", **plan.postfix)
                if log is not None:
                    log.write(rec)
                if self.rank == 0 and ((step + 1) % o.log_every == 0 or step + 1 == o.steps):
                    tqdm.write(
                        f"step {step + 1}/{o.steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} grad_norm "
                        f"{rec['grad_norm']:.3f} {rec['samples_per_s']:.2f} samples/s" + self.task.describe(rec)
                    )
                if self.on_step is not None:
                    self.on_step(step, rec)
                done = step + 1
                if self.ckpt_dir and (done % o.ckpt_every == 0 or done == o.steps):
                    self.last_checkpoint = self.save()
        finally:
            bar.close()
            self.task.close()
            if log is not None:
                log.close()
        return TrainResult(losses, start + len(losses), self.last_checkpoint, unwrap(st.model), st.ema, records)

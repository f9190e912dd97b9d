"""State-dict loading shared by the models: local files only, no pickled code.

``find_weights(path)`` resolves a directory (safetensors, sharded safetensors with an index, or a
torch file) or a single file; ``read_state_dict`` reads safetensors or ``torch.load(weights_only=True)``
and unwraps the usual containers ("state_dict", "model", "module." prefixes); ``load_into`` loads by
name and raises one error listing every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import torch
import torch.nn as nn

WEIGHT_NAMES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "model.pt",
    "model.pth",
    "ema.pt",
)


def find_weights(path: str) -> list[str]:
    """The weight file(s) at ``path``: itself if a file, else the first of WEIGHT_NAMES in the
    directory (an index json expands to its shards), else the only *.safetensors / *.pt / *.pth / *.bin."""
    if os.path.isfile(path):
        return _expand(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint file or directory at {path!r}")
    for name in WEIGHT_NAMES:
        p = os.path.join(path, name)
        if os.path.exists(p):
            return _expand(p)
    found = sorted(
        p for ext in ("safetensors", "pt", "pth", "bin") for p in glob.glob(os.path.join(path, f"*.{ext}"))
    )
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected one weight file in {path!r} (one of {WEIGHT_NAMES}), found {found}"
        )
    return found


def _expand(p: str) -> list[str]:
    if p.endswith(".index.json"):
        with open(p) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(os.path.dirname(p), s) for s in shards]
    return [p]


def read_state_dict(files: str | list[str], device="cpu") -> dict[str, torch.Tensor]:
    """Tensors by name from safetensors or torch files (``weights_only=True``), unwrapped."""
    sd: dict[str, torch.Tensor] = {}
    for f in [files] if isinstance(files, str) else files:
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file

            part = load_file(f, device=str(device))
        else:
            part = torch.load(f, map_location=device, weights_only=True)
        sd.update(unwrap_state_dict(part))
    return sd


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """Take the tensor dict out of {"state_dict": ...} / {"model": ...} / {"ema": ...} containers and
    strip a "module." / "_orig_mod." prefix shared by every key (DDP / torch.compile saves)."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model", "ema", "module") if k in obj), None)
        if inner is None:
            raise ValueError(f"no tensors in checkpoint dict with keys {sorted(obj)[:10]}")
        obj = inner
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def check_state_dict(module: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """(missing, unexpected, mis-shaped as (key, checkpoint shape, model shape)) against the
    module's persistent state."""
    own = module.state_dict(keep_vars=True)
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(
        (k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape
    )
    return missing, unexpected, shapes


def format_mismatch(missing, unexpected, shapes, limit: int = 50) -> str:
    def lst(items):
        s = ", ".join(str(i) for i in items[:limit])
        return s + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {lst(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {lst(unexpected)}")
    if shapes:
        parts.append(
            f"mis-shaped keys ({len(shapes)}): "
            + lst([f"{k} checkpoint {a} vs model {b}" for k, a, b in shapes])
        )
    return "; ".join(parts)


def load_into(
    module: nn.Module, files_or_sd, strict: bool = True, assign: bool = False
) -> tuple[list, list, list]:
    """Load a checkpoint (file list, path or state dict) into ``module`` by name, casting each
    tensor to the model's dtype for that key. ``strict``: any mismatch raises ValueError listing
    all of them; otherwise the matching keys load and the mismatches are returned."""
    sd = files_or_sd if isinstance(files_or_sd, dict) else read_state_dict(files_or_sd)
    missing, unexpected, shapes = check_state_dict(module, sd)
    if strict and (missing or unexpected or shapes):
        raise ValueError(
            f"checkpoint does not match {type(module).__name__}: "
            + format_mismatch(missing, unexpected, shapes)
        )
    bad = {k for k, _, _ in shapes}
    own = module.state_dict(keep_vars=True)
    sd = {
        k: v.to(own[k].dtype) if own[k].is_floating_point() else v
        for k, v in sd.items()
        if k in own and k not in bad
    }
    module.load_state_dict(sd, strict=False, assign=assign)
    return missing, unexpected, shapes


# ---------------------------------------------------------------------------------------------
# training checkpoints: ``ckpt_dir/step-XXXXXXXX/`` written atomically, ``ckpt_dir/latest`` names the newest


def write_step_dir(ckpt_dir: str, step: int, write: Callable[[str], None]) -> str:
    """Build ``ckpt_dir/step-XXXXXXXX`` with ``write(tmp_dir)`` in a temporary directory, move it into place
    with os.replace (re-saving a step moves the old one aside first), then point ``latest`` at it.
    A crash at any point leaves either the previous checkpoint or the new one, never a partial one."""
    os.makedirs(ckpt_dir, exist_ok=True)
    name = f"step-{step:08d}"
    final = os.path.join(ckpt_dir, name)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=ckpt_dir)
    try:
        write(tmp)
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=ckpt_dir)
            os.replace(final, os.path.join(old, name))
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd, tmp_latest = tempfile.mkstemp(prefix=".tmp-latest-", dir=ckpt_dir)
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
    os.replace(tmp_latest, os.path.join(ckpt_dir, "latest"))
    return final


def resolve_resume(path: str) -> str:
    """A checkpoint directory, or a ``ckpt_dir`` whose ``latest`` file names one."""
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, "train_state.pt")):
        raise FileNotFoundError(f"no training checkpoint (train_state.pt) in {path!r}")
    return path

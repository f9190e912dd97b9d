"""State-dict loading shared by the models: local files only, no pickled code.

``find_weights(path)`` resolves a directory (safetensors, sharded safetensors with an index, or a
torch file) or a single file; ``read_state_dict`` reads safetensors or ``torch.load(weights_only=True)``
and unwraps the usual containers ("state_dict", "model", "module." prefixes); ``load_into`` loads by
name and raises one error listing every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
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
    found = sorted(p for ext in ("safetensors", "pt", "pth", "bin") for p in glob.glob(os.path.join(path, f"*.{ext}")))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one weight file in {path!r} (one of {WEIGHT_NAMES}), found {found}")
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
            f"mis-shaped keys ({len(shapes)}): " + lst([f"{k} checkpoint {a} vs model {b}" for k, a, b in shapes])
        )
    return "; ".join(parts)


def load_into(module: nn.Module, files_or_sd, strict: bool = True, assign: bool = False) -> tuple[list, list, list]:
    """Load a checkpoint (file list, path or state dict) into ``module`` by name, casting each
    tensor to the model's dtype for that key. ``strict``: any mismatch raises ValueError listing
    all of them; otherwise the matching keys load and the mismatches are returned."""
    sd = files_or_sd if isinstance(files_or_sd, dict) else read_state_dict(files_or_sd)
    missing, unexpected, shapes = check_state_dict(module, sd)
    if strict and (missing or unexpected or shapes):
        raise ValueError(
            f"checkpoint does not match {type(module).__name__}: " + format_mismatch(missing, unexpected, shapes)
        )
    bad = {k for k, _, _ in shapes}
    own = module.state_dict(keep_vars=True)
    sd = {
        k: v.to(own[k].dtype) if own[k].is_floating_point() else v for k, v in sd.items() if k in own and k not in bad
    }
    module.load_state_dict(sd, strict=False, assign=assign)
    return missing, unexpected, shapes


# ---------------------------------------------------------------------------------------------
# training checkpoints: ``ckpt_dir/step-XXXXXXXX/`` written atomically, ``ckpt_dir/latest`` names the newest

CHECKSUMS = "checksums.json"  # in every step directory: {"sha256": {relative path: hex digest}, "size": {...}}
_STEP = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str) -> None:
    """Give a file made by ``tempfile.mkstemp`` (0600) or a directory made by ``mkdtemp`` (0700) the mode an
    ordinary ``open`` / ``os.makedirs`` would have given it under the process umask."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return sorted(p for p in out if p != CHECKSUMS)


def write_checksums(step_dir: str) -> None:
    """Record the SHA-256 and size of every file under ``step_dir`` in ``step_dir/checksums.json``."""
    files = _files(step_dir)
    data = {
        "sha256": {p: _sha256(os.path.join(step_dir, p)) for p in files},
        "size": {p: os.path.getsize(os.path.join(step_dir, p)) for p in files},
    }
    with open(os.path.join(step_dir, CHECKSUMS), "w") as f:
        json.dump(data, f, indent=1)


def verify_checkpoint(step_dir: str, names: tuple[str, ...] | None = None) -> None:
    """Check the files of ``step_dir`` (all, or ``names``) against its ``checksums.json``; raises
    CheckpointError naming the first missing, truncated or altered file. A directory written before
    checksums were recorded (no ``checksums.json``) is not checked."""
    sums_path = os.path.join(step_dir, CHECKSUMS)
    if not os.path.isfile(sums_path):
        return
    try:
        with open(sums_path) as f:
            sums = json.load(f)
        digests, sizes = sums["sha256"], sums["size"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {sums_path!r} is unreadable ({e})") from None
    for name in names if names is not None else sorted(digests):
        path = os.path.join(step_dir, name)
        if name not in digests:
            raise CheckpointError(f"checkpoint file {path!r} has no recorded checksum in {sums_path!r}")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file {path!r} is missing")
        size = os.path.getsize(path)
        if size != sizes.get(name, size):
            raise CheckpointError(
                f"checkpoint file {path!r} is truncated or altered: {size} bytes, {sizes[name]} were written"
            )
        if _sha256(path) != digests[name]:
            raise CheckpointError(
                f"checkpoint file {path!r} is corrupt: its SHA-256 differs from the one recorded at save"
            )


def load_safetensors_checked(path: str) -> dict[str, torch.Tensor]:
    """``read_state_dict`` of one safetensors file; an unreadable file (bad header, truncated) is a one-line
    CheckpointError naming it."""
    try:
        return read_state_dict(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path!r} is missing") from None
    except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError, and OSError)
        raise CheckpointError(
            f"checkpoint file {path!r} is unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def load_torch_checked(path: str) -> dict:
    """``torch.load(weights_only=True)`` of a training-state file, unreadable files as one-line CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path!r} is missing") from None
    except Exception as e:  # noqa: BLE001 (zip / unpickling errors of several kinds)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint file {path!r} is unreadable: {msg}") from None


def step_of(name: str) -> int | None:
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def list_steps(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the ``step-XXXXXXXX`` directories in ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        s = step_of(name)
        if s is not None and os.path.isdir(os.path.join(ckpt_dir, name)):
            out.append((s, os.path.join(ckpt_dir, name)))
    return sorted(out)


def is_complete(step_dir: str) -> bool:
    """A step directory holds ``train_state.pt`` (and, when written by this code, ``checksums.json``, written
    last). Contents are verified on load, not here."""
    return os.path.isfile(os.path.join(step_dir, "train_state.pt"))


def recover(ckpt_dir: str) -> list[str]:
    """Repair what a kill in ``write_step_dir`` can leave in ``ckpt_dir`` (call at start, with no writer
    running): a step directory moved aside for a re-save (``.old-step-*/step-*``) whose replacement never
    arrived is moved back; every other temporary (``.tmp-*``, ``.old-*``) is removed. Returns what was done,
    one line each."""
    done = []
    if not os.path.isdir(ckpt_dir):
        return done
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if name.startswith(".old-"):
            for inner in os.listdir(path) if os.path.isdir(path) else []:
                final = os.path.join(ckpt_dir, inner)
                if step_of(inner) is not None and not os.path.exists(final):
                    os.replace(os.path.join(path, inner), final)
                    done.append(f"restored {final!r} (moved aside by an interrupted re-save)")
        if name.startswith((".tmp-", ".old-")):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            done.append(f"removed the stale temporary {path!r}")
    newest = newest_checkpoint(ckpt_dir)
    latest = os.path.join(ckpt_dir, "latest")
    if newest is not None:
        name = os.path.basename(newest)
        current = open(latest).read().strip() if os.path.isfile(latest) else None
        if current != name:
            _write_latest(ckpt_dir, name)
            done.append(f"pointed 'latest' at {name} (it named {current!r})")
    return done


def _write_latest(ckpt_dir: str, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-latest-", dir=ckpt_dir)
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
    honour_umask(tmp)
    os.replace(tmp, os.path.join(ckpt_dir, "latest"))


def newest_checkpoint(ckpt_dir: str) -> str | None:
    """The newest complete ``step-*`` directory in ``ckpt_dir`` (by step number; ``latest`` is only a
    pointer for people and other tools and may lag behind after a kill), or None."""
    for _, path in reversed(list_steps(ckpt_dir)):
        if is_complete(path):
            return path
    return None


def prune(ckpt_dir: str, keep_last: int) -> list[str]:
    """Remove all but the newest ``keep_last`` step directories; returns the removed paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    old = [p for _, p in list_steps(ckpt_dir)[:-keep_last]]
    for p in old:
        shutil.rmtree(p)
    return old


def write_step_dir(ckpt_dir: str, step: int, write: Callable[[str], None], keep_last: int | None = None) -> str:
    """Build ``ckpt_dir/step-XXXXXXXX`` with ``write(tmp_dir)`` in a temporary directory, record every file's
    checksum, move it into place with os.replace (re-saving a step moves the old one aside first), point
    ``latest`` at it, then (``keep_last``) remove all but the newest ``keep_last`` steps.
    A kill at any point leaves a complete previous or new step directory; ``recover`` cleans up the rest."""
    os.makedirs(ckpt_dir, exist_ok=True)
    name = f"step-{step:08d}"
    final = os.path.join(ckpt_dir, name)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=ckpt_dir)
    try:
        honour_umask(tmp)
        write(tmp)
        write_checksums(tmp)
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
    _write_latest(ckpt_dir, name)
    if keep_last is not None:
        prune(ckpt_dir, keep_last)
    return final


def resolve_resume(path: str) -> str:
    """A checkpoint directory, or a ``ckpt_dir`` (its newest complete step directory, after ``recover``)."""
    if os.path.isdir(path) and (list_steps(path) or any(n.startswith((".tmp-", ".old-")) for n in os.listdir(path))):
        for line in recover(path):
            print(f"checkpoints: {line}")
        found = newest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no complete training checkpoint (step-*/train_state.pt) in {path!r}")
        return found
    if not os.path.isfile(os.path.join(path, "train_state.pt")):
        raise CheckpointError(f"no training checkpoint (train_state.pt) in {path!r}")
    return path


def has_checkpoint(ckpt_dir: str) -> bool:
    """Whether ``ckpt_dir`` holds any complete step directory or one that ``recover`` can restore."""
    if newest_checkpoint(ckpt_dir) is not None:
        return True
    return os.path.isdir(ckpt_dir) and any(
        n.startswith(".old-") and any(step_of(i) is not None for i in os.listdir(os.path.join(ckpt_dir, n)))
        for n in os.listdir(ckpt_dir)
        if os.path.isdir(os.path.join(ckpt_dir, n))
    )

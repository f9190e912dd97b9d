"""Features extracted once: VAE latents and T5 embeddings of a training set, so that ``train --features`` runs
without loading the VAE or T5 (Open-Sora 1.2's feature-training mode).

``extract_features`` writes ``OUT/shard-AAAAAA-BBBBBB.safetensors`` (clips A..B-1: ``"{i}.z"`` the latent
(C, T', H', W') as the VAE's posterior mode, ``"{i}.y"`` the T5 embedding of the caption's valid tokens (n, d); the
clip's caption, fps, bucket and file in the shard's metadata) and ``OUT/features.json`` (what the set holds). Each
shard is written to a temporary name and renamed into place, so a killed extraction is resumed by running the same
command again: finished shards are kept. ``FeatureDataset`` reads them back as training items.
"""

from __future__ import annotations

import json
import os
import sys

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _shard_name(a: int, b: int) -> str:
    return f"shard-{a:06d}-{b:06d}.safetensors"


def extract_features(
    dataset,
    vae,
    text_encoder,
    out_dir: str,
    *,
    dtype: str = "bf16",
    shard_size: int = 64,
    device=None,
    progress: bool = True,
) -> str:
    """Encode every clip of ``dataset`` (``data.VideoTextDataset``: its fixed bucket) with ``vae`` (posterior mode,
    one clip at a time) and its caption with ``text_encoder``; returns ``out_dir/features.json``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not hasattr(dataset, "bucket"):
        raise ValueError("features are extracted from fixed buckets (--buckets), not from a bucket_config")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # temporaries of a killed run
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
    dev = torch.device(device or "cpu")
    vae = vae.to(dev).eval()
    n = len(dataset)
    ranges = [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]
    done = {r for r in ranges if os.path.isfile(os.path.join(out_dir, _shard_name(*r)))}
    bar = tqdm(total=n, initial=sum(b - a for a, b in done), desc="extract", unit="clip", disable=not progress)
    text_len, channels = None, None
    for a, b in ranges:
        if (a, b) in done:
            continue
        tensors, meta = {}, []
        for i in range(a, b):
            item = dataset[i]
            with torch.no_grad():
                z = vae.encode(item["video"][None].to(dev, vae.dtype), sample=False)[0].float().cpu()
                enc = text_encoder.encode([item["text"]])
            valid = int(enc["mask"][0].sum())
            text_len, channels = enc["mask"].shape[1], z.shape[0]
            tensors[f"{i}.z"] = z.to(_DTYPES[dtype]).contiguous()
            tensors[f"{i}.y"] = enc["y"][0, 0, :valid].float().cpu().to(_DTYPES[dtype]).contiguous()
            path = dataset.items[i][0] if hasattr(dataset, "items") else str(i)
            meta.append({"i": i, "text": item["text"], "fps": float(item["fps"]), "bucket": list(dataset.bucket(i)),
                         "path": path})  # fmt: skip
            bar.update(1)
        dst = os.path.join(out_dir, _shard_name(a, b))
        save_file(tensors, dst + ".tmp", metadata={"clips": json.dumps(meta)})
        os.replace(dst + ".tmp", dst)
    bar.close()
    if text_len is None:  # every shard was already there: keep the description
        with open(os.path.join(out_dir, "features.json")) as f:
            desc = json.load(f)
        text_len, channels = desc["text_len"], desc["latent_channels"]
    desc = {
        "count": n,
        "shards": [_shard_name(*r) for r in ranges],
        "text_len": text_len,
        "latent_channels": channels,
        "text_dim": None,
        "dtype": dtype,
    }
    from safetensors import safe_open

    with safe_open(os.path.join(out_dir, desc["shards"][0]), "pt") as f:
        desc["text_dim"] = f.get_slice(f"{ranges[0][0]}.y").get_shape()[1]
    out = os.path.join(out_dir, "features.json")
    with open(out + ".tmp", "w") as f:
        json.dump(desc, f, indent=1)
    os.replace(out + ".tmp", out)
    return out


class FeatureDataset:
    """The clips of an extracted feature set: ``bucket(i)`` (T, H, W in pixels) and items {"z": latent (fp32),
    "y": (1, L, d) fp32 zero-padded, "ymask": (L,) int64, "text", "fps"}. Shard files are opened lazily in each
    process (DataLoader workers included)."""

    features = True

    def __init__(self, path: str):
        desc_path = os.path.join(path, "features.json")
        if not os.path.isfile(desc_path):
            raise ValueError(
                f"--features {path!r} holds no features.json: run `opensora-fast extract ... --out {path}` "
                "(again, if it was interrupted: finished shards are kept)"
            )
        with open(desc_path) as f:
            self.desc = json.load(f)
        self.path = path
        self.text_len, self.text_dim = self.desc["text_len"], self.desc["text_dim"]
        self.latent_channels = self.desc["latent_channels"]
        from safetensors import safe_open

        self.meta: list[dict] = []
        self.where: list[str] = []
        for shard in self.desc["shards"]:
            p = os.path.join(path, shard)
            if not os.path.isfile(p):
                raise ValueError(f"feature shard {p!r} is missing: run the extraction again to finish it")
            with safe_open(p, "pt") as f:
                for m in json.loads(f.metadata()["clips"]):
                    self.meta.append(m)
                    self.where.append(p)
        self.bad: list = []
        self._open: dict = {}

    def __len__(self) -> int:
        return len(self.meta)

    def bucket(self, i: int) -> tuple[int, int, int]:
        return tuple(self.meta[i]["bucket"])

    def describe(self, i: int) -> str:
        return f"{self.meta[i]['path']!r} (features {self.where[i]})"

    def __getitem__(self, i: int) -> dict:
        from safetensors import safe_open

        p, m = self.where[i], self.meta[i]
        if p not in self._open:
            self._open[p] = safe_open(p, "pt")
        f = self._open[p]
        z = f.get_tensor(f"{m['i']}.z").float()
        yv = f.get_tensor(f"{m['i']}.y").float()
        y = torch.zeros(1, self.text_len, yv.shape[1])
        y[0, : yv.shape[0]] = yv
        ymask = torch.zeros(self.text_len, dtype=torch.int64)
        ymask[: yv.shape[0]] = 1
        return {"z": z, "y": y, "ymask": ymask, "text": m["text"], "fps": m["fps"]}

    def __getstate__(self):  # open handles stay in their process
        return {**self.__dict__, "_open": {}}


# ---------------------------------------------------------------------------------------------
# ``opensora-fast extract``

from dataclasses import dataclass  # noqa: E402

from opensora_fast.common import UsageError, check_device, load_vae, option, options_from, require_path  # noqa: E402


def _parse_buckets(text: str):
    from opensora_fast.data import parse_buckets

    return parse_buckets(text)


@dataclass
class ExtractOptions:
    """The ``opensora-fast extract`` flags."""

    data: str | None = option(None, "CSV with 'path' and 'text' columns", required=True, metavar="CSV")
    vae: str | None = option(None, "OpenSoraVAE weights (local)", required=True, metavar="DIR")
    t5: str | None = option(None, "T5 encoder directory (local)", required=True, metavar="DIR")
    out: str | None = option(None, "the feature directory (run again to resume: finished shards are kept)",
                             required=True, metavar="DIR")  # fmt: skip
    buckets: list | None = option(
        "51x240x426", "frames x height x width buckets, as for train", parse=_parse_buckets, metavar="TxHxW[,...]"
    )
    data_fps: float | None = option(None, "resample clips to this frame rate (default: as stored)", parse=float)
    text_len: int = option(
        300, "T5 tokens per caption: the STDiT3's model_max_length (Open-Sora 1.2: 300; --model-config tiny: 8)"
    )
    dtype: str = option("bf16", "storage precision of latents and embeddings", choices=tuple(_DTYPES))
    shard_size: int = option(64, "clips per safetensors shard", metavar="N")
    device: str | None = option(None, "cuda or cpu (default: cuda when available)")
    no_progress: bool = option(False, "no progress bar")


def run_extract(args) -> int:
    from opensora_fast.data import VideoTextDataset
    from opensora_fast.text import T5TextEncoder

    o = options_from(ExtractOptions, args)
    check_device(o.device)
    dev = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if os.path.exists(o.out) and not os.path.isdir(o.out):
        raise UsageError(f"--out {o.out!r} is a file; give a directory for the features")
    dataset = VideoTextDataset(require_path(o.data, "--data", "the data CSV"), o.buckets, fps=o.data_fps)
    for path in dataset.dropped:
        print(f"left out: {path}: shorter than every bucket ({min(b[0] for b in o.buckets)} frames)", file=sys.stderr)
    for path, line, why in dataset.bad:
        print(f"left out: {path} (line {line}): {why}", file=sys.stderr)
    vae = load_vae(require_path(o.vae, "--vae", "the VAE weights"), device=dev)
    t5_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t5 = require_path(o.t5, "--t5", "the T5 encoder directory")
    text = T5TextEncoder(t5, model_max_length=o.text_len, device=dev, dtype=t5_dtype)
    out = extract_features(
        dataset, vae, text, o.out, dtype=o.dtype, shard_size=o.shard_size, device=dev, progress=not o.no_progress
    )
    print(f"{len(dataset)} clip(s) -> {out} (train with: opensora-fast train --features {o.out} ...)")
    return 0

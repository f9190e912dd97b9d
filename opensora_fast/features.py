"""Features extracted once: VAE latents and T5 embeddings of a training set, so that ``train --features`` runs
without loading the VAE or T5 (Open-Sora 1.2's feature-training mode).

``extract_features`` writes ``OUT/shard-AAAAAA-BBBBBB.safetensors`` (clips A..B-1: ``"{i}.z"`` the latent
(C, T', H', W') as the VAE's posterior mode, ``"{i}.y"`` the T5 embedding of the caption's valid tokens (n, d); the
clip's caption, the prompt T5 encoded, fps, bucket, crop start and file, and the extraction's settings, in the
shard's metadata) and ``OUT/features.json`` (what the set holds). Fixed buckets (``--buckets``) and Open-Sora's
``bucket_config`` are both accepted: each clip's bucket and temporal crop are drawn once, with a fixed seed. Each
shard is written to a temporary name and renamed into place, so a killed extraction is resumed by running the same
command again: finished shards are kept (when their settings and clips are the same). ``FeatureDataset`` reads
them back as training items.
"""

from __future__ import annotations

import json
import os
import sys

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _shard_name(a: int, b: int) -> str:
    return f"shard-{a:06d}-{b:06d}.safetensors"


def _extraction_key(dataset, i: int, seed: int):
    """(key, extra metadata) of clip i: with a bucket_config its first draw for ``seed`` (bucket and crop), with
    fixed buckets its crop of epoch 0 for ``seed``, else the index."""
    if hasattr(dataset, "assigner"):  # data.BucketConfigDataset
        epoch, res, key = dataset.first_draw(i, seed)
        return key, {"resolution": res, "batch_size": dataset.assigner.batch_size(res, key[1]), "draw_epoch": epoch}
    if hasattr(dataset, "crop_key"):  # data.VideoTextDataset
        return dataset.crop_key(i, seed, 0), {}
    return i, {}


def _settings(dataset, seed: int, prompt_cleaning: bool, dtype: str) -> dict:
    """What decides the features besides the clips, recorded in every shard and in features.json."""
    out = {"prompt_cleaning": bool(prompt_cleaning), "seed": int(seed), "dtype": dtype}
    if hasattr(dataset, "assigner"):
        out["bucket_config"] = dataset.assigner.config
        out["frame_interval"] = dataset.assigner.frame_interval
    elif hasattr(dataset, "buckets"):
        out["buckets"] = [list(b) for b in dataset.buckets]
        out["frame_interval"] = dataset.frame_interval
        out["data_fps"] = dataset.fps
    return json.loads(json.dumps(out))  # as read back (tuples as lists, frame counts as strings)


def _check_shard(path: str, settings: dict, paths: list[str]) -> None:
    """A finished shard kept on resume must have been extracted with these settings from these clips."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    got = json.loads(meta["settings"]) if "settings" in meta else None
    if got != settings:
        if got is None:
            diff = "it records no settings (an older extract)"
        else:
            keys = sorted(k for k in set(got) | set(settings) if got.get(k) != settings.get(k))
            diff = "; ".join(f"{k}: {got.get(k)!r} there, {settings.get(k)!r} now" for k in keys)
        raise ValueError(
            f"{path!r} was extracted with other settings ({diff}): give another output directory, or the settings "
            "it was extracted with"
        )
    had = [m["path"] for m in json.loads(meta["clips"])]  # the shard's name fixes its clip range
    for a, b in zip(had, paths):
        if a != b:
            raise ValueError(
                f"{path!r} holds other clips than the data CSV gives now ({a!r} there, {b!r} now): the CSV changed; "
                "give another output directory"
            )


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
    seed: int = 42,
    prompt_cleaning: bool = True,
) -> str:
    """Encode every clip of ``dataset`` with ``vae`` (posterior mode, one clip at a time) and its caption with
    ``text_encoder``; returns ``out_dir/features.json``.

    ``dataset``: ``data.VideoTextDataset`` (fixed buckets: each clip's temporal crop drawn once, epoch 0 of
    ``seed``) or ``data.BucketConfigDataset`` (each clip's bucket and crop drawn once: its first draw for
    ``seed`` that places it, ``BucketConfigDataset.first_draw``); every clip is written with its bucket, so
    ``FeatureDataset.bucket`` groups equal shapes. ``prompt_cleaning``: T5 encodes
    ``text.preprocess_prompt(caption)`` (Open-Sora's text_preprocessing) instead of the caption as written; the
    setting is recorded (``FeatureDataset.prompt_cleaning``). A shard already there is kept only if it was
    extracted with the same settings from the same clips (else ValueError)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from opensora_fast.text import preprocess_prompt

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not hasattr(dataset, "bucket") and not hasattr(dataset, "assigner"):
        raise ValueError("dataset must have fixed buckets (bucket(i)) or a bucket_config (assigner)")
    settings = _settings(dataset, seed, prompt_cleaning, dtype)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # temporaries of a killed run
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
    dev = torch.device(device or "cpu")
    vae = vae.to(dev).eval()
    n = len(dataset)
    clip_path = [dataset.items[i][0] if hasattr(dataset, "items") else str(i) for i in range(n)]
    ranges = [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]
    done = {r for r in ranges if os.path.isfile(os.path.join(out_dir, _shard_name(*r)))}
    for a, b in sorted(done):
        _check_shard(os.path.join(out_dir, _shard_name(a, b)), settings, clip_path[a:b])
    bar = tqdm(total=n, initial=sum(b - a for a, b in done), desc="extract", unit="clip", disable=not progress)
    text_len, channels = None, None
    for a, b in ranges:
        if (a, b) in done:
            continue
        tensors, meta = {}, []
        for i in range(a, b):
            key, extra = _extraction_key(dataset, i, seed)
            item = dataset[key]
            prompt = preprocess_prompt(item["text"]) if prompt_cleaning else item["text"]
            with torch.no_grad():
                z = vae.encode(item["video"][None].to(dev, vae.dtype), sample=False)[0].float().cpu()
                enc = text_encoder.encode([prompt])
            valid = int(enc["mask"][0].sum())
            text_len, channels = enc["mask"].shape[1], z.shape[0]
            tensors[f"{i}.z"] = z.to(_DTYPES[dtype]).contiguous()
            tensors[f"{i}.y"] = enc["y"][0, 0, :valid].float().cpu().to(_DTYPES[dtype]).contiguous()
            bucket = list(key[1:4]) if isinstance(key, tuple) else list(dataset.bucket(i))
            m = {"i": i, "text": item["text"], "prompt": prompt, "fps": float(item["fps"]), "bucket": bucket}
            m.update(path=clip_path[i], start=key[4] if isinstance(key, tuple) else 0, **extra)
            meta.append(m)
            bar.update(1)
        dst = os.path.join(out_dir, _shard_name(a, b))
        save_file(tensors, dst + ".tmp", metadata={"clips": json.dumps(meta), "settings": json.dumps(settings)})
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
        "settings": settings,
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
    """The clips of an extracted feature set: ``bucket(i)`` (T, H, W in pixels: the fixed bucket, or the bucket
    the bucket_config draw gave the clip at extraction) and items {"z": latent (fp32), "y": (1, L, d) fp32
    zero-padded, "ymask": (L,) int64, "text", "fps"}. ``settings``: what the extraction used (features.json);
    ``prompt_cleaning``: whether T5 encoded the cleaned captions (``text.preprocess_prompt``); sets written before
    the setting was recorded encoded them as written (False). Shard files are opened lazily in each process
    (DataLoader workers included)."""

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
        self.settings: dict = self.desc.get("settings", {})
        self.prompt_cleaning = bool(self.settings.get("prompt_cleaning", False))
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

    def bucket_batch_size(self, i: int) -> int | None:
        """The batch size of clip i's bucket in the bucket_config it was extracted with (None: --buckets)."""
        return self.meta[i].get("batch_size")

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
    bucket_config: str | None = option(
        None,
        "Open-Sora's bucket_config, as train --bucket-config (a .py stage config or a .json): each clip's bucket and "
        "crop are drawn once (--seed); replaces --buckets",
        metavar="FILE",
    )
    frame_interval: int = option(1, "take every N-th frame of a random window (Open-Sora's frame_interval)")
    seed: int = option(42, "the draw of each clip's temporal crop (and, with --bucket-config, its bucket)")
    data_fps: float | None = option(None, "resample clips to this frame rate (default: as stored)", parse=float)
    prompt_cleaning: bool = option(
        True,
        "give T5 the captions as written, not Open-Sora's text_preprocessing of them (prompt_cleaning=%(default)s "
        "without this flag); the setting is recorded with the features",
        flag="--no-prompt-cleaning",
    )
    text_len: int = option(
        300, "T5 tokens per caption: the STDiT3's model_max_length (Open-Sora 1.2: 300; --model-config tiny: 8)"
    )
    dtype: str = option("bf16", "storage precision of latents and embeddings", choices=tuple(_DTYPES))
    shard_size: int = option(64, "clips per safetensors shard", metavar="N")
    device: str | None = option(None, "cuda or cpu (default: cuda when available)")
    no_progress: bool = option(False, "no progress bar")


def run_extract(args) -> int:
    from opensora_fast.data import BucketConfigDataset, VideoTextDataset
    from opensora_fast.text import T5TextEncoder

    o = options_from(ExtractOptions, args)
    check_device(o.device)
    dev = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if os.path.exists(o.out) and not os.path.isdir(o.out):
        raise UsageError(f"--out {o.out!r} is a file; give a directory for the features")
    if o.frame_interval < 1:
        raise UsageError(f"--frame-interval must be >= 1, got {o.frame_interval}")
    data = require_path(o.data, "--data", "the data CSV")
    if o.bucket_config:
        if "buckets" in (getattr(args, "explicit", None) or ()):
            raise UsageError("--bucket-config and --buckets exclude each other (the bucket_config names the buckets)")
        if o.data_fps is not None:
            raise UsageError("--data-fps is not used with --bucket-config (clips keep their fps / --frame-interval)")
        try:
            dataset = BucketConfigDataset(data, o.bucket_config, o.frame_interval)
        except ValueError as e:
            raise UsageError(f"--bucket-config: {e}") from None
    else:
        dataset = VideoTextDataset(data, o.buckets, fps=o.data_fps, frame_interval=o.frame_interval)
    for path, why in dataset.left_out:
        print(f"left out: {path}: {why}", file=sys.stderr)
    for path, line, why in dataset.bad:
        print(f"left out: {path} (line {line}): {why}", file=sys.stderr)
    vae = load_vae(require_path(o.vae, "--vae", "the VAE weights"), device=dev)
    t5_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t5 = require_path(o.t5, "--t5", "the T5 encoder directory")
    text = T5TextEncoder(t5, model_max_length=o.text_len, device=dev, dtype=t5_dtype)
    try:
        out = extract_features(
            dataset, vae, text, o.out, dtype=o.dtype, shard_size=o.shard_size, device=dev,
            progress=not o.no_progress, seed=o.seed, prompt_cleaning=o.prompt_cleaning,
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"{len(dataset)} clip(s) -> {out} (train with: opensora-fast train --features {o.out} ...)")
    return 0

"""Features extracted once (VAE latents + T5 embeddings in safetensors shards) and training from them."""

import os

import pytest
import torch
from test_train import cfg, run, setup, tiny_model  # noqa: F401 (the fixture)

from opensora_fast import train as T
from opensora_fast.features import FeatureDataset, extract_features

pytestmark = pytest.mark.usefixtures("reference_backend")


def test_training_from_features_equals_training_from_video(setup, tmp_path):  # noqa: F811
    out = str(tmp_path / "feats")
    extract_features(setup["data"], setup["vae"], setup["text"], out, dtype="fp32", shard_size=5, progress=False)
    feats = FeatureDataset(out)
    assert len(feats) == len(setup["data"]) and feats.latent_channels == 4 and feats.text_len == 8
    assert sorted(os.listdir(out)) == ["features.json"] + [f"shard-{a:06d}-{min(a + 5, 16):06d}.safetensors"
                                                           for a in (0, 5, 10, 15)]  # fmt: skip
    video = run(setup, cfg(steps=4, cache_latents=True, num_workers=0))  # the VAE's posterior mode, as extracted
    c = cfg(steps=4, num_workers=1)
    from_feats = T.train_dit(c, feats, tiny_model(), None, None, device="cpu", progress=False)  # no VAE, no T5
    assert from_feats.losses == pytest.approx(video.losses, rel=1e-6, abs=0)
    print("max relative loss difference", max(abs(a - b) / abs(b) for a, b in zip(from_feats.losses, video.losses)))


def test_extraction_is_resumable_and_bf16_by_default(setup, tmp_path):  # noqa: F811
    out = tmp_path / "feats"
    extract_features(setup["data"], setup["vae"], setup["text"], str(out), shard_size=8, progress=False)
    first, second = out / "shard-000000-000008.safetensors", out / "shard-000008-000016.safetensors"
    from safetensors import safe_open

    with safe_open(str(first), "pt") as f:
        assert f.get_tensor("0.z").dtype == torch.bfloat16 and f.get_tensor("0.y").dtype == torch.bfloat16
    stamp = first.stat().st_mtime_ns
    second.unlink()  # as if killed while writing the second shard
    (out / "shard-000008-000016.safetensors.tmp").write_bytes(b"torn")
    calls = []
    enc = setup["text"]

    class Counting:
        def encode(self, prompts):
            calls.append(len(prompts))
            return enc.encode(prompts)

    extract_features(setup["data"], setup["vae"], Counting(), str(out), shard_size=8, progress=False)
    assert len(calls) == 8 and first.stat().st_mtime_ns == stamp and second.is_file()
    assert not any(n.endswith(".tmp") for n in os.listdir(out))
    assert len(FeatureDataset(str(out))) == 16
    with pytest.raises(ValueError, match="holds no features.json"):
        FeatureDataset(str(tmp_path))

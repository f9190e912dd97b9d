"""Features extracted once (VAE latents + T5 embeddings in safetensors shards) and training from them."""

import os

import pytest
import torch
from test_cli import one_line, weights  # noqa: F401 (the fixture)
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


# ---------------------------------------------------------------------------------------------
# issue 11: features for bucket_config datasets, cleaned captions


class PoolVAE(torch.nn.Module):
    """A stand-in VAE: the posterior mode is the clip average-pooled 4 x 4 in space (so a latent shows its crop)."""

    dtype = torch.float32

    def encode(self, x, sample=False, generator=None):
        assert not sample
        return torch.nn.functional.avg_pool3d(x, (1, 4, 4))


class RecordingT5:
    """A stand-in text encoder that records the prompts it is given; embedding d of token k is the k-th character
    code of the prompt (so the stored features show which text was encoded)."""

    model_max_length = 6

    def __init__(self):
        self.prompts = []

    def encode(self, prompts):
        self.prompts += list(prompts)
        y = torch.zeros(len(prompts), 1, 6, 3)
        mask = torch.zeros(len(prompts), 6, dtype=torch.int64)
        for b, p in enumerate(prompts):
            codes = torch.tensor([float(ord(c)) for c in p[:6]])
            y[b, 0, : len(codes)] = codes[:, None]
            mask[b, : len(codes)] = 1
        return {"y": y, "mask": mask}


@pytest.fixture
def small_256(monkeypatch):
    """Resolution "256" shrunk to 16 x 16 pixels so the 16 x 16 synthetic clips fill it."""
    from opensora_fast import data as D

    monkeypatch.setitem(D.RESOLUTION_AREAS, "256", 16 * 16)


TWO_BUCKETS = {"256": {5: (0.5, 3), 8: ((1.0, 0.5), 2)}}  # 9-frame clips: 8 tried with p 0.5; 5 kept with p 0.5


def test_features_from_a_bucket_config_have_the_buckets_the_dataset_draws(small_256, tmp_path):
    from opensora_fast.data import BucketConfigDataset, BucketSampler, bucket_batches, make_synthetic_dataset

    csv_path = make_synthetic_dataset(str(tmp_path / "data"), 9, (16, 16), 8, colors=("red", "blue", "green"))
    ds = BucketConfigDataset(csv_path, TWO_BUCKETS)
    seed, out = 3, str(tmp_path / "feats")
    extract_features(ds, PoolVAE(), RecordingT5(), out, dtype="fp32", shard_size=10, progress=False, seed=seed)
    feats = FeatureDataset(out)
    assert len(feats) == len(ds) == 24
    # what the dataset assigns for that seed: each clip's key in the first epoch whose draw places it
    first: dict = {}
    for epoch in range(50):
        for batch in BucketSampler(ds, seed).epoch(epoch):
            for key in batch:
                first.setdefault(key[0], (epoch, key))
    assert sorted(first) == list(range(24))
    for j in range(len(feats)):
        epoch, key = first[feats.meta[j]["i"]]
        m = feats.meta[j]
        assert feats.bucket(j) == key[1:4] and m["start"] == key[4] and m["draw_epoch"] == epoch, (j, m, key)
        assert m["batch_size"] == {5: 3, 8: 2}[key[1]] and m["resolution"] == "256"
        z = feats[j]["z"]
        assert z.shape == (3, key[1], 4, 4)
        torch.testing.assert_close(z, PoolVAE().encode(ds[key]["video"][None])[0], rtol=0, atol=0)  # the crop
    shapes = {feats.bucket(j) for j in range(len(feats))}
    assert shapes == {(5, 16, 16), (8, 16, 16)}  # both buckets drawn
    assert any(first[i][0] > 0 for i in first)  # a clip the keep probability left out of epoch 0 was redrawn
    for batch in (next(it) for it in [bucket_batches(feats, 2, 0)] for _ in range(8)):
        assert len({feats.bucket(k) for k in batch}) == 1  # train's batches group equal shapes
        torch.stack([feats[k]["z"] for k in batch])
    # resumable: a lost shard is extracted again with the same draws
    from safetensors.torch import load_file

    shard = tmp_path / "feats" / "shard-000010-000020.safetensors"
    before = load_file(str(shard)), FeatureDataset(out).meta
    shard.unlink()
    extract_features(ds, PoolVAE(), RecordingT5(), out, dtype="fp32", shard_size=10, progress=False, seed=seed)
    after = load_file(str(shard)), FeatureDataset(out).meta
    assert after[1] == before[1] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    with pytest.raises(ValueError, match=r"other settings \(seed: 3 there, 4 now\)"):
        extract_features(ds, PoolVAE(), RecordingT5(), out, dtype="fp32", shard_size=10, progress=False, seed=4)


def test_extract_encodes_the_cleaned_captions_by_default_and_records_it(tmp_path):
    import csv

    from opensora_fast.data import VideoTextDataset, synthetic_clip
    from opensora_fast.io import write_video
    from opensora_fast.text import preprocess_prompt

    captions = ["A Red Square <b>moving</b> UP http://example.com/a.mp4", "a   BLUE circle @someone", "plain text"]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text"])
        for k, c in enumerate(captions):
            write_video(str(tmp_path / f"{k}.mp4"), synthetic_clip("red", "square", "up", 9, (16, 16)), 8)
            w.writerow([f"{k}.mp4", c])
    ds = VideoTextDataset(str(tmp_path / "d.csv"), [(9, 16, 16)])
    cleaned = [preprocess_prompt(c) for c in captions]
    assert cleaned[:2] != captions[:2] and cleaned[2] == captions[2]  # cleaning changes the first two

    rec = RecordingT5()
    extract_features(ds, PoolVAE(), rec, str(tmp_path / "on"), dtype="fp32", progress=False)
    on = FeatureDataset(str(tmp_path / "on"))
    assert rec.prompts == cleaned and on.prompt_cleaning is True and on.settings["prompt_cleaning"] is True
    assert [m["prompt"] for m in on.meta] == cleaned and [m["text"] for m in on.meta] == captions
    y = on[0]["y"][0, : int(on[0]["ymask"].sum()), 0]
    assert "".join(chr(int(v)) for v in y) == cleaned[0][:6]  # the stored embedding is the cleaned prompt's

    rec = RecordingT5()
    extract_features(ds, PoolVAE(), rec, str(tmp_path / "off"), dtype="fp32", progress=False, prompt_cleaning=False)
    off = FeatureDataset(str(tmp_path / "off"))
    assert rec.prompts == captions and off.prompt_cleaning is False and [m["prompt"] for m in off.meta] == captions
    # a resume with the other setting would mix the two: refused, naming it
    with pytest.raises(ValueError, match=r"other settings \(prompt_cleaning: True there, False now\)"):
        extract_features(ds, PoolVAE(), RecordingT5(), str(tmp_path / "on"), dtype="fp32", progress=False,
                         prompt_cleaning=False)  # fmt: skip


def test_extract_command_takes_a_bucket_config_and_no_prompt_cleaning(weights, small_256, tmp_path, capsys):  # noqa: F811
    import json

    from opensora_fast import cli
    from opensora_fast.data import make_synthetic_dataset

    csv_path = make_synthetic_dataset(str(tmp_path / "data"), 9, (16, 16), 8, colors=("red",), shapes=("square",))
    cfg_path = tmp_path / "buckets.json"
    cfg_path.write_text(json.dumps(TWO_BUCKETS))
    feats = str(tmp_path / "feats")
    argv = ["extract", "--data", csv_path, "--vae", weights["vae"], "--t5", weights["t5"], "--out", feats,
            "--bucket-config", str(cfg_path), "--seed", "5", "--text-len", "8", "--no-progress"]  # fmt: skip
    assert cli.main([*argv, "--no-prompt-cleaning"]) == 0
    assert "4 clip(s)" in capsys.readouterr().out
    f = FeatureDataset(feats)
    assert f.prompt_cleaning is False and f.settings["seed"] == 5 and f.settings["bucket_config"]["256"]
    assert {f.bucket(j) for j in range(4)} <= {(5, 16, 16), (8, 16, 16)}
    assert cli.main(argv) == 2  # resumed with cleaning on: refused
    assert "prompt_cleaning: False there, True now" in one_line(capsys.readouterr().err)
    assert cli.main([*argv, "--buckets", "9x16x16"]) == 2
    assert "--bucket-config and --buckets exclude each other" in one_line(capsys.readouterr().err)


def test_training_from_bucket_config_features_batches_each_bucket_alone(setup, small_256, tmp_path):  # noqa: F811
    import json
    import math

    from opensora_fast.data import BucketConfigDataset

    csv_path = os.path.join(str(setup["root"]), "data", "data.csv")
    out, log = str(tmp_path / "feats"), tmp_path / "log.jsonl"
    extract_features(BucketConfigDataset(csv_path, TWO_BUCKETS), setup["vae"], setup["text"], out, dtype="fp32",
                     progress=False)  # fmt: skip
    feats = FeatureDataset(out)
    res = T.train_dit(cfg(steps=6, batch_size=2, num_workers=0), feats, tiny_model(), None, None, device="cpu",
                      progress=False, log_path=str(log))  # fmt: skip
    recs = [json.loads(line) for line in open(log)]
    assert {tuple(r["shape"]) for r in recs} == {(5, 16, 16), (8, 16, 16)}  # each step one bucket's clips
    # each bucket's batch size from the bucket_config (5 frames: 3, 8 frames: 2), not --batch-size 2
    assert {(r["shape"][0], r["batch"]) for r in recs} == {(5, 3), (8, 2)}
    assert all(math.isfinite(v) for v in res.losses)

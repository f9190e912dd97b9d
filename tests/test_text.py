"""T5 text encoding with a tiny random T5 and a word-level tokenizer built locally (no downloads)."""

import pytest
import torch

from opensora_fast.models.stdit3 import STDiT3, STDiT3Config
from opensora_fast.text import T5TextEncoder, append_score, build_tiny_t5, null_caption


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return build_tiny_t5(str(tmp_path_factory.mktemp("t5")), d_model=32, num_layers=1, num_heads=2, d_ff=64)


def test_encode_shapes_padding_truncation(tiny_t5, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = T5TextEncoder(tiny_t5, model_max_length=300)
    prompts = append_score(["a red car drives through the city at night", "a cat"])
    assert prompts[1] == "a cat aesthetic score: 6.5."
    out = enc.encode(prompts + ["sea " * 400])
    y, mask = out["y"], out["mask"]
    assert y.shape == (3, 1, 300, 32) and y.dtype == torch.float32
    assert mask.shape == (3, 300)
    # words + "aesthetic score : 6 . 5 ." + </s>; the over-long prompt is truncated to 300
    assert mask.sum(1).tolist() == [9 + 7 + 1, 2 + 7 + 1, 300]
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # right padding
    # deterministic, and a padded prompt's valid features do not depend on the padding length
    again = enc.encode(prompts)["y"]
    torch.testing.assert_close(again, y[:2])
    short = T5TextEncoder(tiny_t5, model_max_length=40).encode(prompts)["y"]
    torch.testing.assert_close(short[1, 0, :10], y[1, 0, :10], rtol=1e-5, atol=1e-5)


def test_null_caption_from_checkpoint_and_model_input(tiny_t5):
    enc = T5TextEncoder(tiny_t5, model_max_length=8)
    model = STDiT3(STDiT3Config.tiny(caption_channels=enc.output_dim)).eval()
    out = enc.encode(["a dog runs on the beach"])
    y_null = null_caption(model, 1)
    assert y_null.shape == out["y"].shape
    assert torch.equal(y_null[0, 0], model.y_embedder.y_embedding)
    y = torch.cat([out["y"], y_null])
    with torch.no_grad():
        v = model(
            torch.randn(2, 4, 2, 4, 4),
            torch.tensor([500.0, 500.0]),
            y,
            mask=out["mask"],
            fps=torch.tensor([24.0]),
            height=torch.tensor([32.0]),
            width=torch.tensor([32.0]),
        )
    assert v.shape == (2, 8, 2, 4, 4) and torch.isfinite(v).all()


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="only local paths"):
        T5TextEncoder(str(tmp_path / "nope"))

"""``opensora-fast sample`` as Open-Sora 1.2's scripts/inference.py samples: the prompt T5 sees (score
suffixes, then Open-Sora's text_preprocessing), ... Tiny random weights, CPU, reference kernels."""

import pytest
import torch

from opensora_fast import cli
from opensora_fast.models.stdit3 import STDiT3, STDiT3Config
from opensora_fast.models.vae import OpenSoraVAE, OpenSoraVAEConfig
from opensora_fast.sample import save_stdit3
from opensora_fast.text import T5TextEncoder, build_tiny_t5

pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    t5 = build_tiny_t5(str(root / "t5"), extra_text="square circle moving right left up down")
    torch.manual_seed(0)
    OpenSoraVAE(OpenSoraVAEConfig.tiny()).save_pretrained(str(root / "vae"))
    model = STDiT3(STDiT3Config.tiny(in_channels=4, caption_channels=64, model_max_length=8))
    save_stdit3(model.state_dict(), model.config, str(root / "stdit3"))
    return ["--model", str(root / "stdit3"), "--vae", str(root / "vae"), "--t5", t5]


TINY = ["--image-size", "8x8", "--num-frames", "5", "--steps", "1", "--no-progress"]


@pytest.fixture
def encoded(monkeypatch):
    """The prompts T5 is asked to encode, in order."""
    seen = []
    real = T5TextEncoder.encode

    def spy(self, prompts):
        seen.extend(prompts)
        return real(self, prompts)

    monkeypatch.setattr(T5TextEncoder, "encode", spy)
    return seen


def test_prompts_are_cleaned_as_open_sora_cleans_them(weights, encoded, tmp_path):
    prompt = "A RED Square &amp; @bob moving RIGHT https://example.com/x"
    assert cli.main(["sample", prompt, *weights, "--out-dir", str(tmp_path / "a"), *TINY]) == 0
    assert encoded == ["a red square moving right aesthetic score: 6.5."]
    encoded.clear()
    args = ["--flow", "4", "--camera-motion", "Pan Right", "--aes", "5"]
    assert cli.main(["sample", prompt, *weights, "--out-dir", str(tmp_path / "b"), *TINY, *args]) == 0
    assert encoded == ["a red square moving right aesthetic score: 5.0. motion score: 4.0. camera motion: pan right."]
    encoded.clear()
    assert cli.main(["sample", prompt, *weights, "--out-dir", str(tmp_path / "c"), *TINY, "--no-prompt-cleaning"]) == 0
    assert encoded == [prompt + " aesthetic score: 6.5."]

"""Random tiny STDiT3 / VAE / T5 weights saved as a user would have them (for the program tests)."""

from __future__ import annotations

import torch

from opensora_fast.models.stdit3 import STDiT3, STDiT3Config
from opensora_fast.models.vae import OpenSoraVAE, OpenSoraVAEConfig
from opensora_fast.sample import save_stdit3
from opensora_fast.text import build_tiny_t5


def tiny_weights(root, perturb: bool = False) -> dict:
    """Writes ``root``/t5, vae, stdit3 (seed 0) and returns {"root", "t5", "vae", "model"} (paths).
    ``perturb``: the STDiT3's final layer and block modulation tables random (the release's init zeroes the
    final layer, so the velocity would be 0 everywhere)."""
    t5 = build_tiny_t5(str(root / "t5"), extra_text="square circle moving right left up down")
    torch.manual_seed(0)
    OpenSoraVAE(OpenSoraVAEConfig.tiny()).save_pretrained(str(root / "vae"))
    model = STDiT3(STDiT3Config.tiny(in_channels=4, caption_channels=64, model_max_length=8))
    if perturb:
        with torch.no_grad():
            model.final_layer.linear.weight.normal_(0, 0.05)
            for blk in [*model.spatial_blocks, *model.temporal_blocks]:
                blk.scale_shift_table.normal_(0, 0.3)
    save_stdit3(model.state_dict(), model.config, str(root / "stdit3"))
    return {"root": root, "t5": t5, "vae": str(root / "vae"), "model": str(root / "stdit3")}


def weight_args(w: dict) -> list[str]:
    return ["--model", w["model"], "--vae", w["vae"], "--t5", w["t5"]]

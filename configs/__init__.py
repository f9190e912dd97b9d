"""Open-Sora 1.2 configurations as plain dataclasses, installed as ``opensora_fast.configs``:
``stdit3`` (sampling and STDiT3 training) and ``vae`` (the three VAE training stages)."""

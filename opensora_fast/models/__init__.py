from opensora_fast.models.vae import OpenSoraVAE, OpenSoraVAEConfig  # noqa: F401

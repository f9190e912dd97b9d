from opensora_fast.models.stdit3 import STDiT3, STDiT3Block, STDiT3Config  # noqa: F401
from opensora_fast.models.vae import OpenSoraVAE, OpenSoraVAEConfig  # noqa: F401

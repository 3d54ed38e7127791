"""Textual-inversion engine (test-time optimisation of injected token embeddings) and its model backends."""
from .backend import EncodedImages, TextTower, TIBackend, ddpm_add_noise, ddpm_predicted_x0, ddpm_target
from .engine import NonFiniteLossError, StaticTokenEmbeddings, TextualInversionEngine, TIConfig, TIResult

__all__ = [
    "EncodedImages",
    "NonFiniteLossError",
    "StaticTokenEmbeddings",
    "TIBackend",
    "TIConfig",
    "TIResult",
    "TextTower",
    "TextualInversionEngine",
    "ddpm_add_noise",
    "ddpm_predicted_x0",
    "ddpm_target",
]

"""The trainable part of InstantBooth: the two FC heads and one gated adapter per UNet transformer block.

State-dict keys (also the file layout, see ``files.py``)::

    concept_encoder.fc.{weight,bias}                       (text_dim, clip_global_dim)
    patch_encoder.fc.{weight,bias}                         (patch_dim, clip_hidden_dim)
    adapters.<LDM block path>.linear.{weight,bias}         (C, patch_dim)
    adapters.<LDM block path>.norm1.{weight,bias}          (C,)
    adapters.<LDM block path>.attn.to_{q,k,v}.weight       (C, C)
    adapters.<LDM block path>.attn.to_out.0.{weight,bias}  (C, C)
    adapters.<LDM block path>.gamma                        ()  -- the gate, 0 at init

with ``<LDM block path>`` like ``input_blocks.1.1.transformer_blocks.0`` (see ``layout.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import nn

from ...utils.config import MetadataConfig
from .adapter import GatedSelfAttentionAdapter
from .encoders import ConceptEncoder, PatchEncoder
from .layout import parse_ldm_path
from .prompt import DEFAULT_IDENTIFIER, PERSON_NOUNS


@dataclass
class InstantBoothConfig(MetadataConfig):
    clip_hidden_dim: int = 1024  # CLIP vision width (ViT-L/14)
    clip_global_dim: int = 768  # CLIP image-embedding width (ViT-L/14 projection)
    text_dim: int = 768  # text-encoder width (SD1.x: CLIP-L)
    patch_dim: int = 768  # patch-encoder output width
    num_heads: int = 8  # adapter heads (SD1.x transformer blocks use 8)
    identifier: str = DEFAULT_IDENTIFIER  # the word the concept token replaces ("sks", as in the paper)
    class_nouns: tuple[str, ...] = PERSON_NOUNS  # nouns the identifier is put before
    adapters: dict[str, int] = field(default_factory=dict)  # LDM block path -> block width


class InstantBoothModel(nn.Module):
    def __init__(self, config: InstantBoothConfig) -> None:
        super().__init__()
        if not config.adapters:
            raise ValueError("InstantBoothConfig.adapters is empty: give the UNet's transformer blocks (layout.sd_unet_layout).")
        self.config = config
        self.concept_encoder = ConceptEncoder(config.clip_global_dim, config.text_dim)
        self.patch_encoder = PatchEncoder(config.clip_hidden_dim, config.patch_dim)
        # Nested ModuleDicts so state-dict keys read "adapters.input_blocks.1.1.transformer_blocks.0.linear.weight".
        self.adapters = nn.ModuleDict()
        for path, width in sorted(config.adapters.items()):
            parse_ldm_path(path)  # refuses anything that is not a transformer-block path
            node = self.adapters
            parts = path.split(".")
            for part in parts[:-1]:
                if part not in node:
                    node[part] = nn.ModuleDict()
                node = node[part]
            node[parts[-1]] = GatedSelfAttentionAdapter(width, config.patch_dim, config.num_heads)

    def adapter(self, path: str) -> GatedSelfAttentionAdapter:
        node: nn.Module = self.adapters
        for part in path.split("."):
            node = node[part]  # type: ignore[index]
        return node  # type: ignore[return-value]

    def adapter_items(self) -> Iterator[tuple[str, GatedSelfAttentionAdapter]]:
        for path in sorted(self.config.adapters):
            yield path, self.adapter(path)

    def head_parameters(self) -> list[nn.Parameter]:
        """The FC layers of both encoders (paper: lr 1e-4)."""
        return list(self.concept_encoder.parameters()) + list(self.patch_encoder.parameters())

    def adapter_parameters(self) -> list[nn.Parameter]:
        """All adapter layers (paper: lr 1e-6)."""
        return list(self.adapters.parameters())

    def concept(self, image_embeds: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        return self.concept_encoder.concept(image_embeds, alpha)

    def patch_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.patch_encoder.concatenated(hidden_states)

    def gates(self) -> Mapping[str, float]:
        return {p: float(torch.tanh(a.gamma.detach())) for p, a in self.adapter_items()}

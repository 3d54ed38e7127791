"""Face2Diffusion's mapping networks f_map^1 / f_map^2: identity (+ expression) -> two CLIP word vectors.

Two independent MLPs, ``i2t_first`` and ``i2t_last``, each
Linear(id+exp -> hidden) -> Dropout -> LeakyReLU(0.2), Linear(hidden -> hidden) -> Dropout -> LeakyReLU(0.2),
then ``fc_out`` Linear(hidden -> text width). The input is [v_id, v_exp]; when no expression is given the
learned unconditional vector ``null_exp`` takes its place (the paper's \\tilde v_exp). Keys match the
official ``mapping.pt`` exactly (``null_exp``, ``i2t_first.layers.0.0.weight``, ``i2t_first.fc_out.bias``...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...utils.config import MetadataConfig


@dataclass
class F2DMappingConfig(MetadataConfig):
    """Defaults are the official ``IMG2TEXTwithEXP(1536, 1536, 768)``."""

    id_dim: int = 1536
    hidden_dim: int = 1536
    out_dim: int = 768  # CLIP-L text width: SD1.x
    exp_dim: int = 64
    n_layer: int = 2
    dropout: float = 0.1


class MappingMLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, n_layer: int, dropout: float):
        super().__init__()
        layers = []
        dim = in_dim
        for _ in range(n_layer):
            # Dropout before the activation, as in the official network.
            layers.append(nn.Sequential(nn.Linear(dim, hidden_dim), nn.Dropout(dropout), nn.LeakyReLU(0.2)))
            dim = hidden_dim
        self.layers = nn.Sequential(*layers)
        self.fc_out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.layers(x))


class F2DMapping(nn.Module):
    """[v_id, v_exp] -> (B, 2, out_dim): the two word vectors S1*, S2* that replace the placeholder pair."""

    def __init__(self, config: F2DMappingConfig | None = None):
        super().__init__()
        self.config = cfg = config or F2DMappingConfig()
        in_dim = cfg.id_dim + cfg.exp_dim
        self.i2t_first = MappingMLP(in_dim, cfg.hidden_dim, cfg.out_dim, cfg.n_layer, cfg.dropout)
        self.i2t_last = MappingMLP(in_dim, cfg.hidden_dim, cfg.out_dim, cfg.n_layer, cfg.dropout)
        self.null_exp = nn.Parameter(torch.zeros(cfg.exp_dim))

    def mix_expression(
        self, batch: int, expression: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The expression input per sample: ``exp * m + null_exp * (1 - m)``.

        ``expression`` None means "no reference": every row gets ``null_exp`` (what the released inference does).
        ``mask`` (B,) with 1 = use the row's expression, 0 = use ``null_exp``; None means all ones.
        """
        null = self.null_exp.unsqueeze(0)
        if expression is None:
            return null.expand(batch, -1)
        if expression.ndim == 1:
            expression = expression.unsqueeze(0)
        if expression.shape[-1] != self.config.exp_dim:
            raise ValueError(
                f"Expression vectors must have {self.config.exp_dim} coefficients (3DMM expression), got {expression.shape[-1]}."
            )
        expression = expression.to(null)
        if mask is None:
            return expression.expand(batch, -1)
        m = mask.to(null).reshape(-1, 1)
        return expression * m + null * (1 - m)

    def forward(
        self, id_vec: torch.Tensor, expression: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if id_vec.ndim != 2 or id_vec.shape[-1] != self.config.id_dim:
            raise ValueError(
                f"The mapping network expects identity vectors (B, {self.config.id_dim}) from the MSID encoder, "
                f"got {tuple(id_vec.shape)}. Check that the MSID and mapping files belong together."
            )
        exp = self.mix_expression(id_vec.shape[0], expression, mask)
        x = torch.cat([id_vec.to(exp.dtype), exp], dim=-1)
        return torch.stack([self.i2t_first(x), self.i2t_last(x)], dim=1)


def mapping_config_from_state_dict(sd: dict[str, torch.Tensor], dropout: float = 0.1) -> F2DMappingConfig:
    """Read the shapes from an official-layout state dict (dropout is not stored; the official value is 0.1)."""
    try:
        exp_dim = int(sd["null_exp"].shape[0])
        first = sd["i2t_first.layers.0.0.weight"]
        out_dim = int(sd["i2t_first.fc_out.weight"].shape[0])
    except KeyError as exc:
        raise KeyError(f"not a Face2Diffusion mapping state dict: key {exc} is missing") from exc
    n_layer = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("i2t_first.layers."))
    return F2DMappingConfig(
        id_dim=int(first.shape[1]) - exp_dim,
        hidden_dim=int(first.shape[0]),
        out_dim=out_dim,
        exp_dim=exp_dim,
        n_layer=n_layer,
        dropout=dropout,
    )

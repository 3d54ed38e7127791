"""PortraitBooth's training losses (paper Sec. 4.2-4.4): L_total = L_noise + L_loc + L_id.

* ``noise_loss``: the denoising MSE; for the samples chosen (half of them in the paper) only inside the subject's
  face region. As FastComposer (PortraitBooth's base): the mask multiplies prediction and target and the squared
  error takes a plain mean over all elements, so a masked sample weighs its face share of a full one. (Dividing by
  the face area instead would weigh masked samples 4-10x more against the DIP and ECAC terms.)
* Dynamic identity preservation (DIP), ``dip_identity_loss``: for timesteps t <= R_t (250) the one-step estimate
  x^_0 = (z_t - sqrt(1 - a_t) eps^) / sqrt(a_t) is decoded by the VAE, the face is warped to the ArcFace template with
  a differentiable crop (``grid_sample``, the source->crop matrix from the training image's 5 landmarks) and the loss
  is 1 - cos(ArcFace(crop), reference embedding). Larger t give blurry x^_0 whose identity is meaningless.
* Emotion-aware cross-attention control (ECAC), ``localization_loss``, eq. 7: for the identity token i and the
  expression token j, at every probed cross-attention layer l,

      lambda * (mean(A_l^i (1 - M)) + mean(relu(beta - A_l^i) M)) + mu * (mean(A_l^j (1 - M)) + mean(relu(gamma - A_l^j) M))

  averaged over layers, with M the face mask in [0, 1] at the layer's resolution. Responses above beta (0.8) /
  gamma (0.1) inside the face are not pushed further ("truncation"), so both tokens can share the face.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..face.align import invert_affine
from ..textual_inversion.backend import ddpm_predicted_x0
from .stea import arcface_features

R_T = 250
BETA = 0.8
GAMMA = 0.1
LAMBDA_LOC = 1e-3
MU_LOC = 1e-2
MASK_LOSS_PROB = 0.5
TEXT_ONLY_PROB = 0.1
UNCOND_PROB = 0.1
# The paper uses 11 emotion words ("happy, angry, sad, etc."); this list completes it with the common
# basic-emotion and expression words.
EMOTION_WORDS = ("happy", "sad", "angry", "surprised", "fearful", "disgusted", "neutral", "smiling", "laughing",
                 "crying", "serious")
# The training class set: the paper trains with {"man", "woman"} (Sec. 5.1) and its Table 5 shows broader class words
# ({"person"}, {"he", "she"}) do worse. At inference any subject word works; BROAD_IDENTITY_WORDS is the old wider set,
# kept as an option of the data preparation (--identity-words).
IDENTITY_WORDS = ("man", "woman")
BROAD_IDENTITY_WORDS = ("man", "woman", "person", "boy", "girl", "he", "she")


def noise_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
               use_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE over all elements; rows with ``use_mask`` have prediction and target multiplied by ``mask`` (B, 1, h, w at
    latent size) first, as FastComposer does."""
    pred, target = pred.float(), target.float()
    if mask is not None and use_mask is not None and bool(use_mask.any()):
        rows = use_mask.to(pred.device).reshape(-1, 1, 1, 1)
        m = torch.where(rows, mask.float().to(pred.device), torch.ones_like(mask, dtype=torch.float32, device=pred.device))
        pred, target = pred * m, target * m
    return F.mse_loss(pred, target)


def predict_x0(noisy: torch.Tensor, model_output: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """One-step estimate of the clean latent from z_t and the UNet output (epsilon or v), in float32 (the
    training step runs under autocast); the formula is the textual-inversion engine's."""
    return ddpm_predicted_x0(alphas_cumprod.float(), noisy.float(), timesteps, model_output.float(), prediction_type)


def warp_batch(images: torch.Tensor, matrices: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable similarity warp. ``images`` (B, C, H, W); ``matrices`` (B, 2, 3) map source pixels to crop
    pixels (pixel centres at integers, as ``pipelines.face.align``). Returns (B, C, size, size), zero outside."""
    b, _, h, w = images.shape
    inv = torch.stack([invert_affine(m) for m in matrices.detach().cpu()]).to(images.device, torch.float32)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32, device=images.device),
                            torch.arange(size, dtype=torch.float32, device=images.device), indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, -1, 3)  # (1, S*S, 3)
    src = pts @ inv.transpose(1, 2)  # (B, S*S, 2)
    gx = src[..., 0] * 2 / max(w - 1, 1) - 1
    gy = src[..., 1] * 2 / max(h - 1, 1) - 1
    grid = torch.stack([gx, gy], dim=-1).reshape(b, size, size, 2)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def dip_identity_loss(
    decoded: torch.Tensor,
    matrices: torch.Tensor,
    backbone: torch.nn.Module,
    reference: torch.Tensor,
    active: torch.Tensor,
) -> torch.Tensor:
    """1 - cos between ArcFace embeddings of the decoded x^_0 faces and the references, over ``active`` rows.

    ``decoded`` (B, 3, H, W) in [0, 1]; ``matrices`` (B, 2, 3) source->ArcFace-112 crop; ``reference`` (B, D) unit
    embeddings; ``active`` (B,) bool (t <= R_t and the identity was fused). Zero (with a graph) when none is active.
    """
    if not bool(active.any()):
        return decoded.sum() * 0.0
    idx = torch.nonzero(active, as_tuple=False).flatten()
    crops = warp_batch(decoded[idx], matrices[idx], 112).clamp(0, 1).permute(0, 2, 3, 1)
    emb = F.normalize(arcface_features(backbone, crops, ("embedding",)), dim=-1)
    return (1.0 - (emb * F.normalize(reference[idx].to(emb), dim=-1)).sum(-1)).mean()


@dataclass
class TokenAttention:
    """Cross-attention probabilities of one layer at the probed token columns: (B, heads, HW, K)."""

    probs: torch.Tensor
    height: int
    width: int


def _token_map(layer: TokenAttention, column: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w) attention of each sample at its own column (index into the K probed columns)."""
    b, heads, hw, _ = layer.probs.shape
    idx = column.to(layer.probs.device).reshape(b, 1, 1, 1).expand(b, heads, hw, 1)
    return layer.probs.gather(-1, idx)[..., 0].reshape(b, heads, layer.height, layer.width)


def _truncated_term(a: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """mean(A (1 - M)) + mean(relu(cap - A) M) per sample: (B,)."""
    m = mask[:, None]
    return (a * (1 - m)).mean(dim=(1, 2, 3)) + (F.relu(cap - a) * m).mean(dim=(1, 2, 3))


def layer_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, W) face mask -> the layer's resolution (bilinear, antialiased, as FastComposer resizes segmaps)."""
    return F.interpolate(mask.float()[:, None], size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)[:, 0].clamp(0, 1)


def localization_loss(
    layers: Sequence[TokenAttention],
    mask: torch.Tensor,
    identity_column: torch.Tensor,
    expression_column: Optional[torch.Tensor] = None,
    *,
    active: Optional[torch.Tensor] = None,
    has_expression: Optional[torch.Tensor] = None,
    beta: float = BETA,
    gamma: float = GAMMA,
    lam: float = LAMBDA_LOC,
    mu: float = MU_LOC,
) -> torch.Tensor:
    """Eq. 7 averaged over layers and over the ``active`` samples (those whose identity token carries the face).

    ``identity_column`` / ``expression_column`` (B,) index the probed columns of each layer's ``probs``;
    ``has_expression`` (B,) says which samples have an expression word (the mu term counts only for those).
    """
    if not layers:
        raise ValueError("No cross-attention layers were probed.")
    b = mask.shape[0]
    active = torch.ones(b, dtype=torch.bool, device=mask.device) if active is None else active.to(mask.device)
    if not bool(active.any()):
        return layers[0].probs.sum() * 0.0
    total = mask.new_zeros(b)
    for layer in layers:
        m = layer_mask(mask, layer.height, layer.width).to(layer.probs.device)
        total = total + lam * _truncated_term(_token_map(layer, identity_column), m, beta).to(total.device)
        if expression_column is not None and has_expression is not None and bool(has_expression.any()):
            j = _truncated_term(_token_map(layer, expression_column), m, gamma).to(total.device)
            total = total + mu * j * has_expression.to(total.device).float()
    total = total / len(layers)
    return total[active].mean()

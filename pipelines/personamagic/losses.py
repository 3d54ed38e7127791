"""PersonaMagic's losses: masked denoising MSE, Tandem Equilibrium, identity loss with λ_id(t)."""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from ..face.align import warp_affine
from .stages import lambda_id

TE_WEIGHT = 1e-3  # the released code's −0.001 · p_S · p_T
TE_TEMPERATURE = 100.0  # the released code multiplies the two attention columns by 100 before the softmax


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Σ(M·(pred − target)²) / ΣM per sample, averaged over the batch (official); plain MSE when mask is None.

    ``mask`` (B, 1, h, w) or (B, h, w) in [0, 1] at latent resolution, broadcast over channels.
    """
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    m = mask.float().to(err.device)
    m = m.unsqueeze(1) if m.dim() == 3 else m
    m = m.expand_as(err)
    num = (m * err).flatten(1).sum(1)
    den = m.flatten(1).sum(1).clamp_min(1e-8)
    return (num / den).mean()


def mask_to_latent(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(H, W) or (N, H, W) pixel mask → (N, 1, h, w) at latent size by area averaging (soft edges kept)."""
    m = mask.float()
    m = m[None] if m.dim() == 2 else m
    return F.interpolate(m[:, None], size=tuple(size), mode="area").clamp(0, 1)


def tandem_equilibrium_loss(
    attention_probs: torch.Tensor,
    slot_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    weight: float = TE_WEIGHT,
    temperature: float = TE_TEMPERATURE,
) -> torch.Tensor:
    """−weight · p_S · (1 − p_S), averaged over the batch (the released code's version of eq. 1).

    ``attention_probs`` (B, heads, L, L): the last text-encoder layer. Key columns are restricted to the
    prompt's own tokens (``prompt_mask``: True between BOS and EOS, exclusive). S is the placeholder column
    receiving the most attention in total, T the non-placeholder prompt column receiving the most. Per
    (head, query), softmax(temperature · [a_S, a_T]) gives S's share; p_S is its mean. The loss is lowest at
    p_S = ½: the learned tokens and the strongest other word get balanced attention.
    """
    losses = []
    for b in range(attention_probs.shape[0]):
        probs = attention_probs[b].float()  # (H, L, L)
        received = probs.sum(dim=(0, 1))  # attention each key column receives
        is_slot = (slot_ids[b] >= 0) & prompt_mask[b]
        is_word = (slot_ids[b] < 0) & prompt_mask[b]
        if not is_slot.any() or not is_word.any():
            continue
        neg = torch.finfo(received.dtype).min
        s = torch.where(is_slot, received, torch.full_like(received, neg)).argmax()
        t = torch.where(is_word, received, torch.full_like(received, neg)).argmax()
        pair = torch.stack([probs[:, :, s], probs[:, :, t]], dim=-1) * temperature
        p_s = pair.softmax(-1)[..., 0].mean()
        losses.append(-weight * p_s * (1 - p_s))
    if not losses:
        return attention_probs.new_zeros((), dtype=torch.float32)
    return torch.stack(losses).mean()


def prompt_token_mask(ids: torch.Tensor, bos_id: int, eos_id: int) -> torch.Tensor:
    """(B, L) True at the prompt's own tokens: after BOS, before the first EOS (placeholder slots included)."""
    is_eos = ids == eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(ids[:, 0], ids.shape[1]))
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    return (pos >= 1) & (pos < first_eos[:, None])


class Recognizer(Protocol):
    input_size: int

    def embed(self, aligned: torch.Tensor) -> torch.Tensor: ...


def aligned_face_crops(images: torch.Tensor, matrices: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Differentiable ArcFace crops: (B, 3, H, W) in [−1, 1] and (B, 2, 3) source→crop matrices →
    (B, size, size, 3) in [0, 1]. The same warp (grid_sample) as the face analyzer's crops."""
    hwc = ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    return torch.stack([warp_affine(img, m, size) for img, m in zip(hwc, matrices)])


def identity_loss(
    decoded: torch.Tensor,
    matrices: torch.Tensor,
    reference: torch.Tensor,
    recognizer: Recognizer,
    timesteps: torch.Tensor,
    num_timesteps: int = 1000,
) -> torch.Tensor:
    """mean_b λ_id(t_b) · (1 − cos(ArcFace(crop(x̂0_b)), e_b)) (paper eqs. 3–4).

    ``decoded`` (B, 3, H, W) in [−1, 1]: the decoded x̂0; ``matrices`` the reference faces' alignment, so the
    crop lands where the face is in the training image; ``reference`` (B, D) unit ArcFace embeddings.
    """
    crops = aligned_face_crops(decoded, matrices, recognizer.input_size)
    emb = F.normalize(recognizer.embed(crops).float(), dim=-1)
    cos = (emb * F.normalize(reference.float().to(emb.device), dim=-1)).sum(-1)
    weight = lambda_id(timesteps.to(emb.device), num_timesteps)
    return (weight * (1 - cos)).mean()

"""PersonaMagic result files: one .safetensors per identity.

Tensors: the mapper's state dict under the official keys (``input_layer.weight``, ``timestep_proj.0.weight``,
…), plus ``supercategory_embedding`` (D,) and ``image_embed`` (image_dim,), the CLIP image embedding of the
training reference (used when no reference image is given at apply time). Metadata: method, format version,
base family, the mapper config (JSON), stage boundaries and the training settings.

The official ``mapper-steps-N.pt`` stores a pickled Python module object next to the weights, so it cannot
be loaded weights-only and is refused (FaceBooth never unpickles objects).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ...utils.config import ConfigError
from ...utils.files import UnsafeFileError, atomic_save_safetensors, load_state_dict_file
from .mapper import MapperConfig, PersonaMagicMapper, config_from_state_dict
from .stages import StagePlan

log = logging.getLogger(__name__)

METHOD = "personamagic"
FORMAT_VERSION = "1"


@dataclass
class PersonaMagicFile:
    mapper: PersonaMagicMapper
    plan: StagePlan
    family: str
    image_embed: Optional[torch.Tensor]
    supercategory: str = "face"
    metadata: dict[str, str] = field(default_factory=dict)


def save_personamagic(
    path: Union[str, Path],
    mapper: PersonaMagicMapper,
    plan: StagePlan,
    family: str,
    image_embed: Optional[torch.Tensor] = None,
    supercategory: str = "face",
    extra: Optional[Mapping[str, object]] = None,
) -> Path:
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in mapper.state_dict().items()}
    tensors["supercategory_embedding"] = mapper.word_embedding.detach().float().cpu().clone()
    if image_embed is not None:
        tensors["image_embed"] = image_embed.detach().float().cpu().reshape(-1).clone()
    meta = {
        "method": METHOD,
        "format_version": FORMAT_VERSION,
        "base_family": family,
        "dims": f"word={mapper.config.word_dim},image={mapper.config.image_dim}",
        **mapper.config.to_metadata(),
        "t_low": str(plan.t_low),
        "t_high": str(plan.t_high),
        "num_timesteps": str(plan.num_timesteps),
        "stage_source": plan.source,
        "supercategory": supercategory,
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return atomic_save_safetensors(tensors, path, meta)


def load_personamagic(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> PersonaMagicFile:
    path = Path(path)
    state, meta = load_state_dict_file(path)
    if meta.get("method") not in (None, METHOD) or "supercategory_embedding" not in state or "input_layer.weight" not in state:
        raise UnsafeFileError(
            f"{path.name} is not a PersonaMagic file (method {meta.get('method')!r}). "
            "Train one with the 'PersonaMagic Train' node; it writes to models/facebooth/personamagic."
        )
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise UnsafeFileError(f"{path.name} has format version {meta['format_version']}; this FaceBooth reads {FORMAT_VERSION}.")
    word = state.pop("supercategory_embedding").float()
    image_embed = state.pop("image_embed").float() if "image_embed" in state else None
    try:
        config = MapperConfig.from_metadata(meta, source=path.name)
    except ConfigError as exc:
        raise UnsafeFileError(str(exc)) from exc
    if config is None:  # written before configs were stored: read the shapes
        config = config_from_state_dict(state, word_dim=word.shape[0])
    mapper = PersonaMagicMapper(config, word)
    try:
        mapper.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise UnsafeFileError(f"{path.name}: the mapper weights do not fit its config ({exc}).") from exc
    plan = StagePlan(
        t_low=int(meta.get("t_low", 400)), t_high=int(meta.get("t_high", 800)),
        num_timesteps=int(meta.get("num_timesteps", 1000)), source=meta.get("stage_source", "official"),
    )
    family = meta.get("base_family", "sd1")
    return PersonaMagicFile(
        mapper=mapper.to(device).eval().requires_grad_(False), plan=plan, family=family, image_embed=image_embed,
        supercategory=meta.get("supercategory", "face"), metadata=dict(meta),
    )

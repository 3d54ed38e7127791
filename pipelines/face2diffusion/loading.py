"""Load and save Face2Diffusion weights.

Accepted files, both strict:
- the official ``msid.pt`` / ``mapping.pt``: plain ``torch.save``d state dicts, read with ``weights_only=True``
  through :func:`facebooth.utils.files.load_state_dict_file` and used unchanged;
- our ``.safetensors`` files: the same keys, plus metadata (method, component, format version, config).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, TypeVar

import torch

from ...utils.config import ConfigError, MetadataConfig
from ...utils.files import UnsafeFileError, atomic_save_safetensors, load_state_dict_file
from ...utils.state_dict import StateDictMismatchError, check_state_dict
from .mapping import F2DMapping, F2DMappingConfig, mapping_config_from_state_dict
from .msid import MSIDConfig, MSIDEncoder, msid_config_from_state_dict

log = logging.getLogger(__name__)
C = TypeVar("C", bound=MetadataConfig)

METHOD = "face2diffusion"
FORMAT_VERSION = "1"
COMPONENT_MSID = "msid"
COMPONENT_MAPPING = "mapping"


class F2DWeightsError(ValueError):
    """A Face2Diffusion weight file does not fit the model it was given to."""


def _read(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        return load_state_dict_file(path)
    except UnsafeFileError as exc:
        raise F2DWeightsError(
            f"Cannot load the Face2Diffusion {what} file {Path(path).name}: {exc} "
            f"Use the official {what}.pt (a plain state dict) or a FaceBooth .safetensors file."
        ) from exc


def _guess_component(sd: dict[str, torch.Tensor]) -> Optional[str]:
    if "null_exp" in sd or any(k.startswith("i2t_first.") for k in sd):
        return COMPONENT_MAPPING
    if "cls_token" in sd or any(k.startswith("norms.layer_") for k in sd):
        return COMPONENT_MSID
    return None


def _check_component(sd: dict[str, torch.Tensor], meta: dict[str, str], want: str, path: str | os.PathLike) -> None:
    name = Path(path).name
    if meta.get("method") not in (None, METHOD):
        raise F2DWeightsError(f"{name} is a {meta['method']!r} file, not a Face2Diffusion {want} file.")
    got = meta.get("component") or _guess_component(sd)
    if got is None:
        prefixed = [k for k in sd if k.startswith("module.")]
        hint = " Its keys start with 'module.': it was saved from a DataParallel wrapper; strip that prefix." if prefixed else ""
        raise F2DWeightsError(f"{name} does not look like a Face2Diffusion {want} file (unknown key layout).{hint}")
    if got != want:
        raise F2DWeightsError(
            f"{name} is the Face2Diffusion {got} file, but a {want} file was expected here. "
            f"Swap the two inputs: the MSID encoder is msid.pt, the mapping network is mapping.pt."
        )


def _load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
    """Strict load with a message that names the offending keys instead of torch's wall of text."""
    try:
        check_state_dict(model.state_dict(), sd, source=name, network="Face2Diffusion",
                         hint="The file is damaged or comes from a different model; download the official file again.")
    except StateDictMismatchError as exc:
        raise F2DWeightsError(str(exc)) from exc
    for k, v in sd.items():
        if not torch.isfinite(v.float()).all():
            raise F2DWeightsError(f"{name}: tensor {k} contains NaN or inf; the file is damaged.")
    model.load_state_dict(sd, strict=True)


def _stored_config(cls: type[C], meta: Optional[dict[str, str]], name: str) -> Optional[C]:
    try:
        return cls.from_metadata(meta, source=name)
    except ConfigError as exc:
        raise F2DWeightsError(f"{exc} This is not a usable Face2Diffusion file.") from exc


def msid_from_state_dict(sd: dict[str, torch.Tensor], meta: Optional[dict[str, str]] = None, name: str = "state dict") -> MSIDEncoder:
    # The weights give every shape; only the head count and LayerNorm eps need the stored config (official files: defaults).
    stored = _stored_config(MSIDConfig, meta, name)
    try:
        cfg = msid_config_from_state_dict(sd, num_heads=stored.num_heads if stored else None)
    except (KeyError, ValueError) as exc:
        raise F2DWeightsError(f"{name} is not a usable MSID encoder file: {exc}") from exc
    if stored is not None:
        cfg.ln_eps = stored.ln_eps
    model = MSIDEncoder(cfg)
    _load_strict(model, sd, name)
    return model.eval()


def mapping_from_state_dict(sd: dict[str, torch.Tensor], meta: Optional[dict[str, str]] = None, name: str = "state dict") -> F2DMapping:
    stored = _stored_config(F2DMappingConfig, meta, name)
    try:
        cfg = mapping_config_from_state_dict(sd, dropout=stored.dropout if stored else F2DMappingConfig.dropout)
    except (KeyError, ValueError) as exc:
        raise F2DWeightsError(f"{name} is not a usable mapping-network file: {exc}") from exc
    model = F2DMapping(cfg)
    _load_strict(model, sd, name)
    return model.eval()


def load_msid(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> MSIDEncoder:
    """Official ``msid.pt`` or our safetensors -> MSIDEncoder in eval mode."""
    sd, meta = _read(path, COMPONENT_MSID)
    _check_component(sd, meta, COMPONENT_MSID, path)
    model = msid_from_state_dict(sd, meta, Path(path).name)
    log.info("Face2Diffusion MSID encoder %s: %d-d identity from blocks %s (%s).", Path(path).name, model.feature_dim,
             list(model.config.feature_blocks), "FaceBooth file" if meta else "official file")
    return model.to(device=device, dtype=dtype)


def load_mapping(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> F2DMapping:
    """Official ``mapping.pt`` or our safetensors -> F2DMapping in eval mode."""
    sd, meta = _read(path, COMPONENT_MAPPING)
    _check_component(sd, meta, COMPONENT_MAPPING, path)
    model = mapping_from_state_dict(sd, meta, Path(path).name)
    log.info("Face2Diffusion mapping %s: %d -> 2 x %d (%s).", Path(path).name, model.config.id_dim, model.config.out_dim,
             "FaceBooth file" if meta else "official file")
    return model.to(device=device, dtype=dtype)


def _metadata(component: str, config: MetadataConfig, extra: Optional[dict[str, str]]) -> dict[str, str]:
    meta = {"method": METHOD, "component": component, "format_version": FORMAT_VERSION, **config.to_metadata()}
    meta.update({str(k): str(v) for k, v in (extra or {}).items()})
    return meta


def save_msid(model: MSIDEncoder, path: str | os.PathLike, extra_metadata: Optional[dict[str, str]] = None) -> Path:
    """Atomic safetensors write with the official keys; metadata carries the config (heads are not in the weights)."""
    meta = _metadata(COMPONENT_MSID, model.config, {"feature_dim": model.feature_dim, **(extra_metadata or {})})
    return atomic_save_safetensors(model.state_dict(), path, meta)


def save_mapping(model: F2DMapping, path: str | os.PathLike, extra_metadata: Optional[dict[str, str]] = None) -> Path:
    cfg = model.config
    meta = _metadata(
        COMPONENT_MAPPING, cfg, {"base_model": "sd1" if cfg.out_dim == 768 else f"text_width_{cfg.out_dim}", **(extra_metadata or {})}
    )
    return atomic_save_safetensors(model.state_dict(), path, meta)


__all__ = [
    "F2DWeightsError",
    "MSIDConfig",
    "F2DMappingConfig",
    "load_msid",
    "load_mapping",
    "save_msid",
    "save_mapping",
    "msid_from_state_dict",
    "mapping_from_state_dict",
]

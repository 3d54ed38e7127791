"""utils/config.py: one JSON-in-safetensors-metadata pattern for every model config, and old files still load."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import pytest
import torch
from safetensors.torch import save_file

from facebooth.utils.config import ConfigError, MetadataConfig


@dataclass(frozen=True)
class _Cfg(MetadataConfig):
    width: int
    blocks: tuple[int, ...] = (0, 1)
    eps: float = 1e-6
    names: dict[str, int] = field(default_factory=dict)


def test_round_trip_writes_plain_json_under_config():
    cfg = _Cfg(width=8, blocks=(2, 5), names={"a": 3})
    meta = cfg.to_metadata()
    assert list(meta) == ["config"]
    # what the per-model code wrote before: json of asdict with tuples as lists
    assert json.loads(meta["config"]) == {"width": 8, "blocks": [2, 5], "eps": 1e-6, "names": {"a": 3}}
    back = _Cfg.from_metadata({"method": "x", **meta})
    assert back == cfg and isinstance(back.blocks, tuple)
    assert _Cfg.from_metadata({"method": "x"}) is None and _Cfg.from_metadata(None) is None


def test_reading_is_strict_on_unknown_and_required_fields_lenient_on_defaults():
    assert _Cfg.from_dict({"width": 4}) == _Cfg(width=4)  # a file written before `blocks`/`eps` existed
    with pytest.raises(ConfigError, match=r"unknown _Cfg field\(s\) \['depth'\]"):
        _Cfg.from_dict({"width": 4, "depth": 2}, source="m.safetensors")
    with pytest.raises(ConfigError, match=r"required field\(s\) \['width'\]"):
        _Cfg.from_dict({"eps": 1.0})
    with pytest.raises(ConfigError, match="not valid JSON"):
        _Cfg.from_metadata({"config": "{width"})
    with pytest.raises(ConfigError, match="not a JSON object"):
        _Cfg.from_metadata({"config": "[1, 2]"})
    from facebooth.pipelines.portraitbooth.stea import STEAConfig

    with pytest.raises(ConfigError, match="stored STEAConfig is not valid.*Unknown STEA feature source"):
        STEAConfig.from_dict({"feature_source": "pixels"})  # the dataclass's own checks still run


def test_optional_tuples_come_back_as_tuples_and_the_key_can_be_renamed():
    @dataclass(frozen=True)
    class Named(MetadataConfig):
        METADATA_KEY: ClassVar[str] = "mapper_config"  # a file format that already names its key
        dims: Optional[tuple[int, ...]] = None

    meta = Named(dims=(768, 1280)).to_metadata()
    assert meta == {"mapper_config": '{"dims": [768, 1280]}'}
    assert Named.from_metadata(meta).dims == (768, 1280) and Named.from_metadata({"config": "{}"}) is None
    assert Named.from_dict({"dims": None}) == Named()


def test_old_format_files_still_load(tmp_path):
    """Files written by the per-model code before the mixin (metadata built by hand) load unchanged."""
    from dataclasses import asdict

    from facebooth.pipelines.face2diffusion.loading import load_mapping, load_msid
    from facebooth.pipelines.face2diffusion.mapping import F2DMapping, F2DMappingConfig
    from facebooth.pipelines.face2diffusion.msid import MSIDConfig, MSIDEncoder

    msid_cfg = MSIDConfig(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=3, feature_blocks=(0, 1), ln_eps=1e-5)
    old = asdict(msid_cfg) | {"feature_blocks": [0, 1]}
    msid = MSIDEncoder(msid_cfg)
    save_file(msid.state_dict(), str(tmp_path / "msid.safetensors"),
              {"method": "face2diffusion", "component": "msid", "format_version": "1", "config": json.dumps(old)})
    got = load_msid(tmp_path / "msid.safetensors")
    assert got.config == msid_cfg  # num_heads and ln_eps are only in the metadata

    map_cfg = F2DMappingConfig(id_dim=16, hidden_dim=12, out_dim=8, exp_dim=4, dropout=0.3)
    save_file(F2DMapping(map_cfg).state_dict(), str(tmp_path / "map.safetensors"),
              {"method": "face2diffusion", "component": "mapping", "format_version": "1", "config": json.dumps(asdict(map_cfg))})
    assert load_mapping(tmp_path / "map.safetensors").config == map_cfg

    from facebooth.pipelines.instantbooth.files import load_instantbooth
    from facebooth.pipelines.instantbooth.model import InstantBoothConfig, InstantBoothModel

    ib_cfg = InstantBoothConfig(clip_hidden_dim=16, clip_global_dim=12, text_dim=32, patch_dim=8, num_heads=4,
                                identifier="zwx", adapters={"input_blocks.1.1.transformer_blocks.0": 32})
    old_ib = asdict(ib_cfg) | {"class_nouns": list(ib_cfg.class_nouns)}
    save_file(InstantBoothModel(ib_cfg).state_dict(), str(tmp_path / "ib.safetensors"),
              {"method": "instantbooth", "format": "facebooth.instantbooth", "format_version": "1", "base_model": "sd15",
               "config": json.dumps(old_ib, sort_keys=True)})
    assert load_instantbooth(tmp_path / "ib.safetensors").config == ib_cfg

    from facebooth.pipelines.portraitbooth import fastcomposer_loading as fcl
    from facebooth.pipelines.portraitbooth.stea import STEAConfig, STEAModel

    stea_cfg = STEAConfig(text_dim=16, feature_dim=12, hidden_dim=16, feature_source="arcface", arcface_layers=("layer3",))
    stea = STEAModel(stea_cfg)
    old_stea = asdict(stea_cfg) | {"arcface_layers": ["layer3"]}
    tensors = {f"stea.{k}": v for k, v in stea.fuse.state_dict().items()}
    meta = {"method": "portraitbooth", "component": "stea", "format_version": "1", "config": json.dumps(old_stea, sort_keys=True)}
    save_file(tensors, str(tmp_path / "stea.safetensors"), meta)
    assert fcl.load_stea(tmp_path / "stea.safetensors").config == stea_cfg

    # an unknown field is refused with the loader's own error type and a message that names it
    save_file(tensors, str(tmp_path / "new.safetensors"), meta | {"config": json.dumps(old_stea | {"gamma": 1})})
    with pytest.raises(fcl.FastComposerWeightsError, match="gamma"):
        fcl.load_stea(tmp_path / "new.safetensors")
    assert torch.equal(fcl.load_stea(tmp_path / "stea.safetensors").fuse.state_dict()["mlp1.fc1.weight"],
                       stea.fuse.state_dict()["mlp1.fc1.weight"])

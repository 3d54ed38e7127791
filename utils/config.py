"""One way to save and load a model's dataclass config: JSON under one key of a safetensors file's metadata.

A config class is a ``@dataclass`` that also inherits :class:`MetadataConfig`::

    @dataclass
    class MyConfig(MetadataConfig):
        width: int = 64
        layers: tuple[int, ...] = (0, 1)

    meta = {"method": "...", **cfg.to_metadata()}       # {"config": '{"layers": [0, 1], "width": 64}'}
    cfg = MyConfig.from_metadata(meta, source=name)     # None when the file has no config (an official file)

Reading is strict where it protects the user and lenient where old files need it:

- a field the class does not know is an error (a newer FaceBooth or a different model wrote the file);
- a missing field takes its default when it has one (a file written before the field existed), else it is an error;
- a JSON list is turned back into a tuple for ``tuple[...]`` fields (JSON has no tuples).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar, Mapping, Optional, TypeVar

C = TypeVar("C", bound="MetadataConfig")


def _is_tuple_type(hint: Any) -> bool:
    """``tuple[...]``, also inside ``Optional[...]`` / unions."""
    if typing.get_origin(hint) is tuple or hint is tuple:
        return True
    return any(_is_tuple_type(arg) for arg in typing.get_args(hint)) if typing.get_origin(hint) is typing.Union else False


class ConfigError(ValueError):
    """A stored config cannot be read into its dataclass."""


class MetadataConfig:
    """Mixin for dataclass configs stored as JSON in safetensors metadata (see the module docstring)."""

    METADATA_KEY: ClassVar[str] = "config"

    def to_dict(self) -> dict[str, Any]:
        """Field values, JSON-ready (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_metadata(self) -> dict[str, str]:
        """``{METADATA_KEY: json}``, to merge into a safetensors metadata dict."""
        return {self.METADATA_KEY: self.to_json()}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, source: str = "the stored config") -> C:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: the {cls.__name__} is not a JSON object (got {type(data).__name__}).")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"{source}: unknown {cls.__name__} field(s) {unknown}; the file was written by a newer FaceBooth "
                f"or for a different model. Known fields: {sorted(fields)}."
            )
        missing = sorted(
            name for name, f in fields.items()
            if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ConfigError(f"{source}: the {cls.__name__} lacks the required field(s) {missing}; the file is damaged.")
        hints = typing.get_type_hints(cls)
        values = {k: tuple(v) if isinstance(v, list) and _is_tuple_type(hints.get(k)) else v for k, v in data.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: the stored {cls.__name__} is not valid ({exc}).") from exc

    @classmethod
    def from_json(cls: type[C], text: str, *, source: str = "the stored config") -> C:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: broken '{cls.METADATA_KEY}' metadata, not valid JSON ({exc}).") from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def from_metadata(cls: type[C], meta: Optional[Mapping[str, str]], *, source: str = "the file") -> Optional[C]:
        """The config stored in ``meta``, or None when the file carries none (an official or foreign file)."""
        raw = (meta or {}).get(cls.METADATA_KEY)
        if not raw:
            return None
        return cls.from_json(raw, source=source)


__all__ = ["ConfigError", "MetadataConfig"]

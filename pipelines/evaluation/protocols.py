"""The papers' evaluation protocols as data: ``protocols/<name>.json``, loaded and checked here.

A protocol says which prompts a paper evaluates (templates with the subject placeholder and ``{class}``),
how the placeholder becomes a word for the CLIP score, which recognizer and CLIP model score the images,
how an image without a face counts, which prompt categories leave the identity score, and the numbers the
paper reports. Nothing here loads a model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

PROTOCOL_DIR = Path(__file__).resolve().parent / "protocols"
IDENTITY_MODELS = ("arcface", "facenet")
IDENTITY_SCORES = ("cosine", "l2_distance")
# How an image without a detected face enters the identity mean.
NO_FACE_RULES = {
    "exclude": "left out of the identity mean (the detection rate is reported beside it)",
    "zero": "counted as 0.0",
    "minus_one": "counted as -1 (the lowest cosine)",
}
METRICS = ("identity", "text", "clip_i")


class ProtocolError(ValueError):
    """A protocol file is malformed or names something unknown."""


@dataclass(frozen=True)
class PromptSpec:
    text: str  # template: the placeholder stands for the subject, {class} for its class word
    category: str = ""


@dataclass(frozen=True)
class Column:
    metric: str
    label: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class ReportedRow:
    method: str
    setting: str
    values: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    source: str
    dataset: str
    placeholder: Optional[str]
    placeholder_replacement: Optional[str]
    class_word: str
    subjects: dict[str, str]
    images_per_prompt: int
    prompts_complete: bool
    prompts: tuple[PromptSpec, ...]
    identity_model: str
    identity_score: str
    no_face: str
    identity_clamp_min: Optional[float]
    exclude_categories: frozenset[str]
    clip_model: str
    clip_weights: str
    clip_scale: float
    clip_clamp_min: Optional[float]
    columns: tuple[Column, ...]
    reported_table: str
    reported: tuple[ReportedRow, ...]
    notes: tuple[str, ...]

    # -- prompts -----------------------------------------------------------------------------

    def class_word_for(self, subject: str = "") -> str:
        """The class word of a subject (PortraitBooth's man/woman per subject), else the protocol's."""
        return self.subjects.get(Path(subject).stem, self.class_word) if subject else self.class_word

    def generation_prompt(self, template: str, trigger: str, subject: str = "") -> str:
        """What to generate with: the placeholder becomes the method's trigger (e.g. ``embedding:alice``)."""
        text = template.replace("{class}", self.class_word_for(subject))
        if self.placeholder:
            text = text.replace(self.placeholder, trigger)
        return _squash(text)

    def text_prompt(self, prompt: str, subject: str = "", triggers: Sequence[str] = ()) -> str:
        """The sentence the CLIP score compares with: each trigger (and the placeholder) replaced as the paper does."""
        word = self.class_word_for(subject)
        replacement = word if self.placeholder_replacement is None else self.placeholder_replacement
        text = prompt.replace("{class}", word)
        # ComfyUI's embedding syntax always names the learned subject (Cross Initialization, textual inversion)
        text = _EMBEDDING.sub(lambda _m: replacement, text)
        for trig in sorted({t for t in (*triggers, self.placeholder or "") if t}, key=len, reverse=True):
            text = text.replace(trig, replacement)
        if replacement.strip():  # "f l person" -> "person person" -> "person"
            text = re.sub(rf"\b({re.escape(replacement.strip())})(\s+\1\b)+", r"\1", text)
        return _squash(text)

    def category_of(self, text_prompt: str, subject: str = "") -> str:
        """The category of the protocol prompt whose CLIP sentence equals ``text_prompt`` ('' when none)."""
        key = _norm(text_prompt)
        for p in self.prompts:
            if _norm(self.text_prompt(p.text, subject)) == key:
                return p.category
        return ""

    def with_overrides(self, **changes: Any) -> "Protocol":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_EMBEDDING = re.compile(r"\(?embedding:[^\s,()]+(?::[0-9.]+)?\)?")


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _norm(text: str) -> str:
    return _squash(text).lower().rstrip(".")


def available_protocols() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.json"))


def load_protocol(name_or_path: str | Path) -> Protocol:
    """A protocol by name (``cross_init``, ``f2d``, ...) or from a JSON file of the same schema."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = PROTOCOL_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ProtocolError(f"Unknown protocol {name_or_path!r}; choose one of {', '.join(available_protocols())} or give a .json file.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"Cannot read protocol file {path}: {exc}") from exc
    return parse_protocol(data, source=str(path))


def _float_or_none(value: Any, where: str, problems: list[str]) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{where} must be a number or null, got {value!r}")
        return None
    return float(value)


def parse_protocol(data: dict, source: str = "protocol") -> Protocol:
    problems: list[str] = []
    ident = data.get("identity") or {}
    text = data.get("text") or {}
    if ident.get("model") not in IDENTITY_MODELS:
        problems.append(f"identity.model must be one of {IDENTITY_MODELS}, got {ident.get('model')!r}")
    if ident.get("score", "cosine") not in IDENTITY_SCORES:
        problems.append(f"identity.score must be one of {IDENTITY_SCORES}, got {ident.get('score')!r}")
    if ident.get("no_face", "exclude") not in NO_FACE_RULES:
        problems.append(f"identity.no_face must be one of {tuple(NO_FACE_RULES)}, got {ident.get('no_face')!r}")
    if not isinstance(text.get("clip_model"), str) or not text.get("clip_model"):
        problems.append("text.clip_model must name an open_clip architecture (e.g. ViT-B-32-quickgelu)")
    columns = []
    for i, c in enumerate(data.get("columns") or []):
        if c.get("metric") not in METRICS:
            problems.append(f"columns[{i}].metric must be one of {METRICS}, got {c.get('metric')!r}")
            continue
        columns.append(Column(c["metric"], str(c.get("label") or c["metric"]), bool(c.get("higher_is_better", True))))
    reported = []
    rep = data.get("reported") or {}
    for i, r in enumerate(rep.get("rows") or []):
        values = {m: v for m in METRICS if (v := _float_or_none(r.get(m), f"reported.rows[{i}].{m}", problems)) is not None}
        extra = {str(k): float(v) for k, v in (r.get("extra") or {}).items()}
        reported.append(ReportedRow(str(r.get("method", "?")), str(r.get("setting", "")), values, extra))
    prompts = []
    for i, p in enumerate(data.get("prompts") or []):
        if not isinstance(p, dict) or not isinstance(p.get("text"), str):
            problems.append(f"prompts[{i}] must be an object with a 'text' string")
            continue
        prompts.append(PromptSpec(p["text"], str(p.get("category", ""))))
    n = data.get("images_per_prompt", 1)
    if not isinstance(n, int) or n < 1:
        problems.append(f"images_per_prompt must be a positive integer, got {n!r}")
    if problems:
        raise ProtocolError(f"{source} is not a valid evaluation protocol:\n" + "\n".join(f"  - {p}" for p in problems))
    return Protocol(
        name=str(data.get("name") or Path(source).stem),
        title=str(data.get("title", "")),
        source=str(data.get("source", "")),
        dataset=str(data.get("dataset", "")),
        placeholder=data.get("placeholder") or None,
        placeholder_replacement=data.get("placeholder_replacement"),
        class_word=str(data.get("class_word", "person")),
        subjects={str(k): str(v) for k, v in (data.get("subjects") or {}).items()},
        images_per_prompt=int(n),
        prompts_complete=bool(data.get("prompts_complete", False)),
        prompts=tuple(prompts),
        identity_model=ident["model"],
        identity_score=ident.get("score", "cosine"),
        no_face=ident.get("no_face", "exclude"),
        identity_clamp_min=_float_or_none(ident.get("clamp_min"), "identity.clamp_min", problems),
        exclude_categories=frozenset(ident.get("exclude_categories") or ()),
        clip_model=text["clip_model"],
        clip_weights=str(text.get("weights", "")),
        clip_scale=float(text.get("scale", 1.0)),
        clip_clamp_min=_float_or_none(text.get("clamp_min"), "text.clamp_min", problems),
        columns=tuple(columns) or (Column("identity", "Identity"), Column("text", "Text")),
        reported_table=str(rep.get("table", "")),
        reported=tuple(reported),
        notes=tuple(str(n) for n in data.get("notes") or ()),
    )

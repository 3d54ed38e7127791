"""Identity embeddings as safetensors files (models/facebooth/identities/<name>.safetensors)."""
from __future__ import annotations

from pathlib import Path


from ...utils.files import UnsafeFileError, atomic_save_safetensors, load_state_dict_file
from .types import Identity

FORMAT = "facebooth.identity"
FORMAT_VERSION = "1"


def save_identity(identity: Identity, path: str | Path) -> Path:
    return atomic_save_safetensors(
        {"embedding": identity.embedding.float(), "per_face": identity.per_face.float()},
        path,
        metadata={
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "recognizer": identity.recognizer,
            "count": str(identity.count),
            "dim": str(int(identity.embedding.shape[-1])),
        },
    )


def load_identity(path: str | Path) -> Identity:
    tensors, meta = load_state_dict_file(path)
    if meta.get("format") != FORMAT or "embedding" not in tensors or "per_face" not in tensors:
        raise UnsafeFileError(
            f"{Path(path).name} is not a FaceBooth identity file (expected keys 'embedding' and 'per_face' and "
            f"metadata format={FORMAT}). Make one with the Save Identity node."
        )
    emb, per_face = tensors["embedding"].float(), tensors["per_face"].float()
    if emb.dim() != 1 or per_face.dim() != 2 or per_face.shape[1] != emb.shape[0]:
        raise UnsafeFileError(f"{Path(path).name} has inconsistent shapes {tuple(emb.shape)} / {tuple(per_face.shape)}.")
    return Identity(embedding=emb, per_face=per_face, recognizer=meta.get("recognizer", "unknown"))

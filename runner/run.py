"""Running example workflows against a ComfyUI server: faces uploaded, placeholders filled, outputs read."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .client import ComfyClient, OutputImage, ProgressCallback
from .drawn_face import png_bytes, synthetic_face
from .examples import load_workflow, workflow_name
from .local_setup import MissingModelError
from .placeholders import substitute


def run_workflow(
    client: ComfyClient,
    workflow: Mapping | str | os.PathLike,
    substitutions: Mapping[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    on_progress: ProgressCallback | None = None,
) -> list[OutputImage]:
    """Queue one API workflow (path or dict), wait for it, and return its output images with their bytes."""
    name = "workflow"
    if not isinstance(workflow, Mapping):
        name = workflow_name(workflow)
        workflow = load_workflow(workflow)
    api = substitute(workflow, dict(substitutions or {}), name=name)
    prompt_id = client.queue_prompt(api)
    entry = client.wait(prompt_id, timeout=timeout, on_progress=on_progress)
    return client.output_images(prompt_id, entry)


def to_pil(outputs: Iterable[OutputImage]):
    from PIL import Image

    images = []
    for out in outputs:
        img = Image.open(io.BytesIO(out.data))
        img.load()
        images.append(img)
    return images


def check_checkpoint_available(client: ComfyClient, name: str) -> None:
    listed = client.models("checkpoints")
    if name not in listed:
        shown = ", ".join(listed[:10]) + (" ..." if len(listed) > 10 else "") if listed else "none"
        raise MissingModelError(
            f"ComfyUI at {client.url} has no checkpoint named {name!r} in models/checkpoints (it lists: {shown}). "
            "Pass --checkpoint with one of those names, or put the file into that ComfyUI's models/checkpoints."
        )


def upload_faces(client: ComfyClient, faces: list[str | os.PathLike] | None, seed: int = 0) -> dict[str, str]:
    """Upload the user's faces (or two drawn ones) and return FACE_IMAGE / FACE_IMAGE_2."""
    names: dict[str, str] = {}
    keys = ["FACE_IMAGE", "FACE_IMAGE_2"]
    faces = list(faces or [])
    for k, key in enumerate(keys):
        if k < len(faces):
            path = Path(faces[k]).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"Face image not found: {path}")
            names[key] = client.upload_image(path, f"facebooth_face_{k + 1}{path.suffix.lower() or '.png'}")
        else:
            names[key] = client.upload_image(png_bytes(synthetic_face(seed + k)), f"facebooth_drawn_face_{k + 1}.png")
    return names

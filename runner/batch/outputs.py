"""Output files: deterministic names, atomic writes, the workflow and job values in PNG metadata.

ComfyUI's SaveImage already writes the filled workflow (``prompt``) and every ``extra_pnginfo`` entry as PNG
text chunks; the batch passes the job as ``extra_pnginfo["facebooth_job"]``. Images from nodes that do not
(a preview, a server run with ``--disable-metadata``) get the same chunks added here, without re-encoding
the pixels.
"""
from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..client import OutputImage

IMAGES_DIR = "images"
JOB_CHUNK = "facebooth_job"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG (empty for other formats)."""
    if not data.startswith(_PNG_SIGNATURE):
        return {}
    out, pos = {}, len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and b"\0" in body:
            key, value = body.split(b"\0", 1)
            out[key.decode("latin-1")] = value.decode("latin-1")
        if kind == b"IEND":
            break
        pos += 12 + length
    return out


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def with_png_text(data: bytes, texts: Mapping[str, str]) -> bytes:
    """``data`` with tEXt chunks for the keys it lacks, inserted before IEND (pixels untouched)."""
    present = png_text(data)
    missing = {k: v for k, v in texts.items() if k not in present}
    if not missing or not data.startswith(_PNG_SIGNATURE):
        return data
    end = data.rfind(b"IEND") - 4
    if end < len(_PNG_SIGNATURE):
        raise ValueError("not a complete PNG (no IEND chunk)")
    # tEXt is Latin-1; JSON with ensure_ascii keeps any text representable.
    extra = b"".join(_chunk(b"tEXt", k.encode("latin-1") + b"\0" + v.encode("latin-1", "replace")) for k, v in missing.items())
    return data[:end] + extra + data[end:]


def job_metadata(job_values: Mapping[str, Any], key: str, name: str) -> dict[str, Any]:
    return {"key": key, "name": name, "values": dict(job_values)}


def file_name(job_name: str, index: int, source_name: str) -> str:
    suffix = Path(source_name).suffix.lower() or ".png"
    return f"{job_name}_{index:02d}{suffix}"


def write_job_outputs(out_dir: Path, job_name: str, images: Iterable[OutputImage], api_prompt: Mapping,
                      job_meta: Mapping[str, Any]) -> list[str]:
    """Write each image atomically as ``images/<job name>_<nn>.<ext>``; returns paths relative to ``out_dir``.

    The same job always gets the same names, so a job collected twice (after a crash) replaces its files
    instead of adding copies.
    """
    from ...utils.files import atomic_write

    texts = {"prompt": json.dumps(api_prompt), JOB_CHUNK: json.dumps(job_meta)}
    written = []
    for k, image in enumerate(images, start=1):
        rel = Path(IMAGES_DIR) / file_name(job_name, k, image.filename)
        data = with_png_text(image.data, texts)
        atomic_write(out_dir / rel, lambda tmp, d=data: Path(tmp).write_bytes(d))
        written.append(rel.as_posix())
    return written


def remove_partial_files(out_dir: Path) -> int:
    """Temporary files an interrupted run left behind (``atomic_write`` names them ``.<name>.*.tmp``)."""
    removed = 0
    folder = out_dir / IMAGES_DIR
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed

"""Nodes that read a file by name re-read it when it changes (issue 10, point 6), in a real ComfyUI.

The same prompt is queued twice with the file rewritten in between; ComfyUI reuses a node's cached output
unless its ``fingerprint_inputs`` changes, so without the file's state in the fingerprint the second prompt
would show the first file's content."""
from __future__ import annotations

import torch

from facebooth.pipelines.face.identity_io import save_identity
from facebooth.pipelines.face.types import Identity


def _identity(tag: str, seed: int) -> Identity:
    g = torch.Generator().manual_seed(seed)
    per_face = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1)
    return Identity(embedding=torch.nn.functional.normalize(per_face.mean(0), dim=0), per_face=per_face, recognizer=tag)


def _shown(client, prompt: dict) -> str:
    prompt_id = client.queue_prompt(prompt)
    entry = client.wait(prompt_id, timeout=300)
    texts = entry["outputs"]["2"]["text"]
    return "".join(texts)


def test_load_identity_returns_the_rewritten_file(comfy_server, comfy_base_dir):
    folder = comfy_base_dir / "models" / "facebooth" / "identities"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fingerprint_person.safetensors"
    save_identity(_identity("recognizer-A", 1), path)
    prompt = {
        "1": {"class_type": "FaceBoothLoadIdentity", "inputs": {"identity_file": path.name}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    client = comfy_server.client
    first = _shown(client, prompt)
    assert "recognizer-A" in first
    save_identity(_identity("recognizer-B", 2), path)  # e.g. Save Identity from another photo
    second = _shown(client, prompt)
    assert "recognizer-B" in second and "recognizer-A" not in second, second

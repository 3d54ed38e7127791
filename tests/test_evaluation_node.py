"""CLIP Score node with ComfyUI imported as a library (skipped without COMFYUI_DIR): it finds the weight file in
models/facebooth/evaluation, runs the model under a ModelPatcher, and returns what the host-independent scorer
computes for the same images (itself checked against transformers in test_evaluation_clip.py)."""
from __future__ import annotations

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from facebooth.pipelines.evaluation.clip_score import load_clip_scorer  # noqa: E402

TINY = {
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
NAME = "FaceBoothNodeTinyCLIP"


@pytest.fixture(scope="module")
def comfy_node(comfy):
    import folder_paths

    from facebooth.nodes import evaluation as node

    return node, folder_paths


@pytest.fixture()
def weights(tmp_path, comfy_node, monkeypatch):
    from safetensors.torch import save_file

    node, folder_paths = comfy_node
    cfg = tmp_path / f"{NAME}.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    model = open_clip.create_model(NAME, pretrained=None)
    torch.manual_seed(0)
    state = {k: (v + 0.02 * torch.randn_like(v)) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    folder = tmp_path / "evaluation"
    (folder / "open_clip").mkdir(parents=True)
    path = folder / "open_clip" / f"{NAME}.random.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "facebooth/evaluation", ([str(folder)], {".safetensors"}))
    return path, cfg


def test_clip_score_node_matches_the_scorer(comfy_node, weights):
    node, _ = comfy_node
    path, cfg = weights
    images = torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(1))
    text = "a person on the beach\na person in the snow\na watercolor painting of a person"
    out = node.CLIPScore.execute(images=images, text=text, one_text_per_line=True, clip_weights=f"open_clip/{path.name}",
                                 architecture="auto (from the file name)", score="cosine", device="cpu")
    scores, mean = out.result
    ref = load_clip_scorer(NAME, path).text_scores(list(images), text.splitlines())
    torch.testing.assert_close(torch.tensor(scores), ref, atol=1e-6, rtol=0)
    assert mean == pytest.approx(float(ref.mean()), abs=1e-6)
    assert json.loads(out.ui.as_dict()["text"][0])["model"] == NAME  # the architecture was read from the file name

    out2 = node.CLIPScore.execute(images=images, text="a person", one_text_per_line=False, clip_weights=f"open_clip/{path.name}",
                                  architecture=NAME, score="CLIPScore (2.5 x max(cos, 0))", device="cpu")
    ref2 = load_clip_scorer(NAME, path).text_scores(list(images), ["a person"] * 3, scale=2.5, clamp_min=0.0)
    torch.testing.assert_close(torch.tensor(out2.result[0]), ref2, atol=1e-6, rtol=0)


def test_clip_score_node_errors(comfy_node, weights):
    node, _ = comfy_node
    path, _ = weights
    images = torch.rand(2, 32, 32, 3)
    with pytest.raises(ValueError, match="2 images"):
        node.CLIPScore.execute(images=images, text="one line", one_text_per_line=True, clip_weights=f"open_clip/{path.name}",
                               architecture=NAME, score="cosine", device="cpu")
    with pytest.raises(ValueError, match="needs a text"):
        node.CLIPScore.execute(images=images, text="  ", one_text_per_line=False, clip_weights=f"open_clip/{path.name}",
                               architecture=NAME, score="cosine", device="cpu")
    with pytest.raises(FileNotFoundError, match="facebooth/evaluation"):
        node.CLIPScore.execute(images=images, text="x", one_text_per_line=False, clip_weights="open_clip/absent.safetensors",
                               architecture=NAME, score="cosine", device="cpu")

"""Evaluation node: CLIP Score (IMAGE + text -> one score per image and their mean), beside ID Similarity.

The math lives in pipelines/evaluation/clip_score.py (open_clip, local weight files only); this module picks
the file from models/facebooth/evaluation, keeps the model under ComfyUI's ModelPatcher and reports.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from comfy_api.latest import io, ui

from . import model_folders
from .common import DEVICE_CHOICES, ModelCache, comfy_hooks, load_managed, managed

log = logging.getLogger(__name__)
CATEGORY = "FaceBooth/Face"
_CACHE = ModelCache(max_items=2)
_AUTO = "auto (from the file name)"
# Architectures open_clip ships; OpenAI's weights need the -quickgelu ones.
ARCHITECTURES = [_AUTO, "ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu", "ViT-L-14-336-quickgelu",
                 "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-bigG-14"]
SCORE_CHOICES = {"cosine": (1.0, None), "CLIPScore (2.5 x max(cos, 0))": (2.5, 0.0)}


def _weight_files() -> list[str]:
    return [f.replace("\\", "/") for f in model_folders.list_files("facebooth/evaluation") if not f.startswith("facenet/")]


def _architecture(choice: str, file_name: str) -> str:
    """The chosen architecture, or the longest open_clip name the file name starts with."""
    if choice != _AUTO:
        return choice
    from ..pipelines.evaluation.clip_score import import_open_clip

    stem = os.path.basename(file_name)
    names = [n for n in import_open_clip().list_models() if stem.startswith(n)]
    if not names:
        raise ValueError(
            f"Cannot tell the CLIP architecture from the file name '{stem}'. Pick it in 'architecture' "
            "(OpenAI weights: ViT-B-32-quickgelu or ViT-L-14-quickgelu), or name the file <architecture>.<anything>.safetensors."
        )
    return max(names, key=len)


class CLIPScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothCLIPScore",
            display_name="CLIP Score",
            category=CATEGORY,
            description="Text fidelity of images: the CLIP cosine between each image and the prompt (open_clip, local "
            "weights in models/facebooth/evaluation/open_clip; `python -m facebooth weights fetch --method evaluation`). "
            "Put it beside ID Similarity to see identity and prompt fidelity together.",
            inputs=[
                io.Image.Input("images", tooltip="Images to score, e.g. a sampler's decoded output."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="The sentence the images should show. Write the subject as a plain word (e.g. 'a person "
                                "on the beach'), not as a trigger token or embedding name, as the papers do."),
                io.Boolean.Input("one_text_per_line", default=False,
                                 tooltip="On: line k of the text scores image k (as many lines as images). Off: the whole text scores every image."),
                io.Combo.Input("clip_weights", options=_weight_files() or ["(none found)"],
                               tooltip="open_clip weight file from models/facebooth/evaluation (e.g. open_clip/ViT-B-32-quickgelu.openai.safetensors)."),
                io.Combo.Input("architecture", options=ARCHITECTURES, default=_AUTO,
                               tooltip="open_clip architecture of the file. 'auto' reads it from the start of the file name."),
                io.Combo.Input("score", options=list(SCORE_CHOICES), default="cosine",
                               tooltip="'cosine': the raw CLIP similarity most papers report (~0.2-0.35 for real weights). "
                               "'CLIPScore': Hessel et al.'s 2.5 x max(cosine, 0), as PersonaMagic reports."),
                io.Combo.Input("device", options=DEVICE_CHOICES, default="auto", tooltip="Where CLIP runs. 'auto' uses ComfyUI's device."),
            ],
            outputs=[
                io.Float.Output(display_name="scores", tooltip="One CLIP score per image, in batch order.", is_output_list=True),
                io.Float.Output(display_name="mean", tooltip="Mean CLIP score over the batch."),
            ],
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, text: str, one_text_per_line: bool, clip_weights: str, architecture: str,
                score: str, device: str) -> io.NodeOutput:
        from ..pipelines.evaluation.clip_score import clip_score_from_cosine, load_clip_scorer

        if images.dim() == 3:
            images = images[None]
        n = images.shape[0]
        texts = [t.strip() for t in text.splitlines() if t.strip()] if one_text_per_line else [text.strip()]
        if not texts or not texts[0]:
            raise ValueError("CLIP Score needs a text: the sentence the images should show.")
        if one_text_per_line and len(texts) != n:
            raise ValueError(f"'one text per line' is on, but the text has {len(texts)} non-empty lines for {n} images. "
                             "Give one line per image, or turn it off to score every image against the whole text.")
        texts = texts if one_text_per_line else texts * n
        arch = _architecture(architecture, clip_weights)
        path = model_folders.resolve_file("facebooth/evaluation", clip_weights)

        def load():
            scorer = load_clip_scorer(arch, path)
            return scorer, managed(scorer.model, device)

        scorer, patcher = _CACHE.get((path, arch, device), load)
        load_managed(patcher)
        scorer.device = patcher.load_device
        hooks = comfy_hooks(n, cls.hidden.unique_id if cls.hidden is not None else None)
        feats = []
        for start in range(0, n, scorer.batch_size):
            hooks.check_interrupt()
            feats.append(scorer.encode_images(list(images[start:start + scorer.batch_size])))
            hooks.progress(min(start + scorer.batch_size, n), n, None)
        scale, clamp = SCORE_CHOICES[score]
        cos = (torch.cat(feats) * scorer.encode_texts(texts)).sum(-1)
        scores = [float(v) for v in clip_score_from_cosine(cos, scale, clamp)]
        mean = sum(scores) / len(scores)
        report = json.dumps({"mean": round(mean, 4), "scores": [round(s, 4) for s in scores], "model": arch})
        return io.NodeOutput(scores, mean, ui=ui.PreviewText(report))


NODES = [CLIPScore]

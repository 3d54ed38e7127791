"""Workflows of the batch integration tests: a tiny txt2img (64 px, 2 steps) and a face-detection graph.

Test sizes live here, never in the shipped example workflows.
"""
from __future__ import annotations

TXT2IMG = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "$CHECKPOINT"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "$PROMPT", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {"seed": "$SEED", "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                               "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "batch/${WORKFLOW}", "images": ["8", 0]}},
}

FACES = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "$FACE_IMAGE"}},
    "2": {"class_type": "FaceBoothFaceAnalyzerTorch", "inputs": {"detector": "mtcnn", "recognizer": "$ARCFACE",
                                                               "face_parser": "none (landmark hull)",
                                                               "min_face_size": 20, "device": "cpu"}},
    "3": {"class_type": "FaceBoothDetectFaces", "inputs": {"face_analyzer": ["2", 0], "image": ["1", 0],
                                                         "mode": "aligned crop", "which_face": "largest",
                                                         "face_index": 0, "no_face": "error"}},
    "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "batch/faces", "images": ["3", 2]}},
}

PROMPTS = ["a portrait photo of a person", "an oil painting of a person"]

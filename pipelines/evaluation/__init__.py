"""Evaluation metrics of the papers' protocols: identity similarity, detection rate, CLIP score, CLIP-I.

Host-independent (no ComfyUI import): ``cli/eval.py`` and ``nodes/evaluation.py`` are thin clients.
"""

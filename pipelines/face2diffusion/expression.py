"""The optional expression input of Face2Diffusion (paper Sec. 3.3, "expression guidance").

The official model was trained with 64 expression coefficients of a 3D face reconstruction model
(Deep3DFaceRecon, BFM expression basis) concatenated to the identity vector, dropped with p = 0.2 in
favour of a learned unconditional vector ``null_exp``. At inference the released code always uses
``null_exp``, which lets the prompt decide the expression. No expression encoder ships with the official
code, so this module only defines the interface: any encoder that returns 64 coefficients per aligned face
can be plugged in; without one the null vector is used.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ...utils.files import load_state_dict_file

EXPRESSION_DIM = 64
TRAIN_EXPRESSION_DROPOUT = 0.2  # paper eq. 4

ExpressionInput = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]]


def prepare_expression(
    expression: ExpressionInput, batch: int, dim: int = EXPRESSION_DIM
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Turn what the user gave into the mapping network's ``(expression, mask)`` arguments.

    - None: (None, None), every sample uses ``null_exp`` (the official inference).
    - a (dim,) or (N, dim) tensor: used for all samples (N == 1) or per sample (N == batch).
    - a list with one entry per sample, each a (dim,) tensor or None: rows given None use ``null_exp``
      (mask 0), the others their coefficients (mask 1).
    """
    if expression is None:
        return None, None
    if isinstance(expression, torch.Tensor):
        exp = expression.reshape(-1, expression.shape[-1]) if expression.ndim else expression
        _check_dim(exp, dim)
        if exp.shape[0] not in (1, batch):
            raise ValueError(f"Got {exp.shape[0]} expression vectors for {batch} faces; give one, or one per face.")
        if not torch.isfinite(exp).all():
            raise ValueError("The expression coefficients contain NaN or inf; re-run the expression encoder.")
        return exp.expand(batch, -1), None
    rows = list(expression)
    if len(rows) != batch:
        raise ValueError(f"Got {len(rows)} expression entries for {batch} faces; give one entry (or None) per face.")
    given = [r for r in rows if r is not None]
    if not given:
        return None, None
    ref = given[0].reshape(-1)
    _check_dim(ref.unsqueeze(0), dim)
    exp = torch.zeros(batch, dim, dtype=ref.dtype, device=ref.device)
    mask = torch.zeros(batch, dtype=ref.dtype, device=ref.device)
    for i, r in enumerate(rows):
        if r is None:
            continue
        r = r.reshape(-1)
        _check_dim(r.unsqueeze(0), dim)
        exp[i] = r.to(exp)
        mask[i] = 1
    return exp, mask


def expression_dropout_mask(
    has_expression: torch.Tensor, p: float = TRAIN_EXPRESSION_DROPOUT, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Training mask (paper eq. 4): keep a sample's expression with probability 1 - p, else use ``null_exp``.

    ``has_expression`` (B,) marks samples that have coefficients at all; the others always get the null vector.
    """
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"Expression dropout must be in [0, 1], got {p}.")
    keep = torch.rand(has_expression.shape, generator=generator, device=has_expression.device) >= p
    return (keep & has_expression.bool()).to(torch.float32)


def _check_dim(exp: torch.Tensor, dim: int) -> None:
    if exp.ndim != 2 or exp.shape[-1] != dim:
        raise ValueError(
            f"Face2Diffusion expression vectors have {dim} coefficients (3DMM expression basis); got shape {tuple(exp.shape)}."
        )


def load_expression(path: str | os.PathLike) -> torch.Tensor:
    """64 expression coefficients from a .npy (as the mapping training reads) or a .safetensors file
    (a tensor named ``expression``, or the only one). Refuses pickled arrays, other sizes and NaN/inf."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if path.lower().endswith(".npy"):
        try:
            value = torch.from_numpy(np.load(path, allow_pickle=False).astype("float32"))
        except ValueError as exc:  # object arrays need pickle: refused
            raise ValueError(f"{name} is not a plain numeric .npy file ({exc}).") from exc
    else:
        sd, _meta = load_state_dict_file(path)
        if "expression" in sd:
            value = sd["expression"]
        elif len(sd) == 1:
            value = next(iter(sd.values()))
        else:
            raise ValueError(f"{name} holds {len(sd)} tensors; name the 64 coefficients 'expression'.")
    value = value.float().reshape(-1)
    if value.numel() != EXPRESSION_DIM:
        raise ValueError(
            f"{name} holds {value.numel()} numbers; a Face2Diffusion expression is {EXPRESSION_DIM} 3DMM expression "
            "coefficients (e.g. the 'exp' coefficients of Deep3DFaceRecon)."
        )
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf.")
    return value


EXPRESSION_SUFFIXES = (".npy", ".safetensors")


def list_expression_files(roots: Sequence[str | os.PathLike]) -> list[str]:
    """Expression files below any of ``roots`` (sub-folders too), as sorted '/'-separated relative names."""
    names: set[str] = set()
    for root in roots:
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for f in files:
                if f.lower().endswith(EXPRESSION_SUFFIXES):
                    names.add(os.path.relpath(os.path.join(dirpath, f), root).replace("\\", "/"))
    return sorted(names)


def find_expression_file(roots: Sequence[str | os.PathLike], name: str) -> str:
    """The first ``root/name`` that is a file inside its root (a name cannot climb out with '..')."""
    for root in roots:
        root = os.path.abspath(root)
        path = os.path.abspath(os.path.join(root, name))
        if os.path.commonpath([root, path]) == root and os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"FaceBooth: expression file '{name}' not found in: {', '.join(os.fspath(r) for r in roots)}. "
        "Put a .npy (64 coefficients) or .safetensors file there and refresh the page."
    )

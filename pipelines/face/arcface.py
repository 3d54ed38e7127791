"""ArcFace identity embeddings from insightface's IResNet backbones (arcface_torch ``backbone.pth``).

The module tree mirrors ``recognition/arcface_torch/backbones/iresnet.py`` so official files load
unchanged: stem ``conv1``/``bn1``/``prelu``; ``layer1..4`` of ``IBasicBlock`` (``bn1``, ``conv1``,
``bn2``, ``prelu``, ``conv2`` with the stride, ``bn3``, and a ``downsample`` 1x1 conv + BN on each
layer's first block); then ``bn2``, ``dropout``, ``fc`` (512*7*7 -> 512) and ``features``
(BatchNorm1d). Depth is read from the number of blocks per layer in the state dict
(18: 2-2-2-2, 34: 3-4-6-3, 50: 3-4-14-3, 100: 3-13-30-3, 200: 6-26-60-6).

Input convention (as insightface's ArcFaceONNX feeds the network): 112x112 aligned RGB crop,
normalised as (x - 0.5) / 0.5 for x in [0, 1].
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...utils.files import load_state_dict_file, require_weight_file
from ...utils.state_dict import load_strict

logger = logging.getLogger(__name__)

DEPTH_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
INPUT_SIZE = 112
_FEATURE_MAP = 7  # 112 / 2**4 after four stride-2 layers


@dataclass(frozen=True)
class IResNetConfig:
    layers: tuple[int, int, int, int] = DEPTH_LAYERS[50]
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    stem_width: int = 64
    num_features: int = 512

    @classmethod
    def for_depth(cls, depth: int, **kwargs) -> "IResNetConfig":
        if depth not in DEPTH_LAYERS:
            raise ValueError(f"Unknown IResNet depth {depth}; choose one of {sorted(DEPTH_LAYERS)}.")
        return cls(layers=DEPTH_LAYERS[depth], **kwargs)

    @property
    def depth(self) -> Optional[int]:
        for depth, layers in DEPTH_LAYERS.items():
            if layers == tuple(self.layers):
                return depth
        return None

    @property
    def arch(self) -> str:
        depth = self.depth
        return f"iresnet{depth}" if depth is not None else "iresnet-" + "-".join(map(str, self.layers))


def _bn2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5)


class IBasicBlock(nn.Module):
    """Pre-activation-style block: BN, 3x3 conv, BN, PReLU, 3x3 conv (carries the stride), BN, + skip."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = _bn2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = _bn2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = _bn2d(channels)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), _bn2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        skip = x if self.downsample is None else self.downsample(x)
        return out + skip


class IResNet(nn.Module):
    """arcface_torch IResNet: (N, 3, 112, 112) normalised -> (N, num_features) unnormalised embedding."""

    def __init__(self, config: IResNetConfig = IResNetConfig()) -> None:
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(3, config.stem_width, 3, 1, 1, bias=False)
        self.bn1 = _bn2d(config.stem_width)
        self.prelu = nn.PReLU(config.stem_width)
        in_channels = config.stem_width
        for index, (blocks, width) in enumerate(zip(config.layers, config.widths), start=1):
            # Every layer halves the resolution in its first block.
            stage = [IBasicBlock(in_channels, width, stride=2)]
            stage += [IBasicBlock(width, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            in_channels = width
        self.bn2 = _bn2d(in_channels)
        self.dropout = nn.Dropout(p=0.0)  # parameter-free; kept so the module tree reads like the original
        self.fc = nn.Linear(in_channels * _FEATURE_MAP * _FEATURE_MAP, config.num_features)
        self.features = nn.BatchNorm1d(config.num_features, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet(depth: int, **kwargs) -> IResNet:
    """IResNet of a standard depth (18, 34, 50, 100, 200); kwargs override widths etc. (tests)."""
    return IResNet(IResNetConfig.for_depth(depth, **kwargs))


# ----------------------------------------------------------------------------------------------
# State dict -> config
# ----------------------------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")
_PREFIXES = ("module.", "backbone.", "model.")


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (DataParallel ``module.``, training-wrapper ``backbone.``) if every key has it."""
    state = dict(state)
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def config_from_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> IResNetConfig:
    """Infer layers, widths and embedding size from an arcface_torch IResNet state dict."""
    needed = ("conv1.weight", "fc.weight", "features.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        sample = sorted(state)[:6]
        raise ValueError(
            f"{source} is not an arcface_torch IResNet backbone: keys {missing} are missing (it has e.g. {sample}). "
            "Use the backbone.pth of an insightface arcface_torch model (e.g. ms1mv3_arcface_r100_fp16) or a "
            "file converted from it; insightface's .onnx models need the insightface option instead."
        )
    counts = [0, 0, 0, 0]
    for key in state:
        m = _BLOCK_KEY.match(key)
        if m:
            layer, block = int(m.group(1)), int(m.group(2))
            counts[layer - 1] = max(counts[layer - 1], block + 1)
    if min(counts) == 0:
        raise ValueError(f"{source}: could not find blocks for all of layer1..layer4 (blocks per layer {counts}).")
    widths = tuple(int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5))
    fc_in = int(state["fc.weight"].shape[1])
    if fc_in != widths[3] * _FEATURE_MAP * _FEATURE_MAP:
        raise ValueError(
            f"{source}: fc takes {fc_in} inputs, but a 112x112 IResNet gives {widths[3]}x7x7 = "
            f"{widths[3] * 49}. This backbone was not trained for 112x112 crops."
        )
    return IResNetConfig(
        layers=tuple(counts),
        widths=widths,
        stem_width=int(state["conv1.weight"].shape[0]),
        num_features=int(state["fc.weight"].shape[0]),
    )


def iresnet_from_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> IResNet:
    """Build the IResNet a state dict describes and load it strictly, with readable errors.

    The network is built on the meta device (no random init) and takes the file's tensors as its parameters
    (``assign``): float32 tensors, e.g. from a memory-mapped file, are used without a copy.
    """
    state = _strip_prefix(state)
    config = config_from_state_dict(state, source)
    with torch.device("meta"):
        model = IResNet(config)
    load_strict(model, state, source=source, network=config.arch, assign=True,
                hint="Is this an arcface_torch iresnet backbone.pth?")
    return model.eval()


def _fold_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, memory_format: torch.memory_format) -> nn.Conv2d:
    """Fold ``bn`` into ``conv`` in place (torch's ``fuse_conv_bn_weights`` arithmetic, so the same floats).

    The fused weight is written straight into a new tensor of the wanted memory format, and the conv drops its old
    weight: one layer's worth of extra memory at a time, never a copy of the whole network.
    """
    var_rsqrt = torch.rsqrt(bn.running_var + bn.eps)
    weight = torch.empty_like(conv.weight, memory_format=memory_format)
    torch.mul(conv.weight, (bn.weight * var_rsqrt).reshape(-1, 1, 1, 1), out=weight)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.bias = nn.Parameter((bias - bn.running_mean) * var_rsqrt * bn.weight + bn.bias, requires_grad=False)
    return conv


def fold_batchnorm(model: IResNet, memory_format: torch.memory_format = torch.contiguous_format) -> IResNet:
    """Fold every BatchNorm that follows a conv or feeds a linear layer into it, in place (eval mode only).

    Outputs, and every stage's output, are unchanged up to float rounding; inference gets faster. The first
    BatchNorm of each block (``bn1``) precedes a zero-padded conv, so folding it would change the border pixels:
    it stays. Folded BatchNorms become ``nn.Identity`` so code that walks the stages keeps working. Folded conv
    weights are made in ``memory_format`` (channels-last for fast CPU inference) without a second conversion copy,
    and the tensors they replace are released layer by layer: loading peaks near one copy of the weights.
    """
    if getattr(model, "_bn_folded", False):
        return model
    with torch.no_grad():
        _fold_conv(model.conv1, model.bn1, memory_format)
        model.bn1 = nn.Identity()
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for block in getattr(model, name):
                _fold_conv(block.conv1, block.bn2, memory_format)
                _fold_conv(block.conv2, block.bn3, memory_format)
                block.bn2, block.bn3 = nn.Identity(), nn.Identity()
                if block.downsample is not None:
                    block.downsample = nn.Sequential(_fold_conv(block.downsample[0], block.downsample[1], memory_format))
        # bn2 (per channel, before flatten) and features (BatchNorm1d after fc) both fold into fc: first bn2 into
        # the fc's inputs, then (torch's fuse_linear_bn_weights arithmetic) features into its outputs.
        bn, fc, feat = model.bn2, model.fc, model.features
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        per_input = fc.in_features // scale.numel()  # flatten order: channel-major, 7x7 positions each
        weight = fc.weight * scale.repeat_interleave(per_input)
        bias = fc.bias + fc.weight @ shift.repeat_interleave(per_input)
        feat_scale = feat.weight * torch.rsqrt(feat.running_var + feat.eps)
        weight.mul_(feat_scale.unsqueeze(-1))  # in place on our own new tensor: no third copy of the largest layer
        fc.weight = nn.Parameter(weight, requires_grad=False)
        fc.bias = nn.Parameter((bias - feat.running_mean) * feat_scale + feat.bias, requires_grad=False)
        model.bn2, model.features = nn.Identity(), nn.Identity()
    model._bn_folded = True
    return model.requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Recognizer
# ----------------------------------------------------------------------------------------------


class ArcFaceRecognizer:
    """``FaceRecognizer`` protocol: (N, 112, 112, 3) aligned RGB crops in [0, 1] -> (N, D) unit vectors.

    Parameters are frozen, but ``embed`` does not switch off autograd: an identity loss in training can
    backpropagate to the input crops.
    """

    input_size = INPUT_SIZE

    def __init__(
        self,
        backbone: IResNet,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        name: Optional[str] = None,
        batch_size: int = 64,
        channels_last: bool = False,
    ) -> None:
        """``channels_last``: keep the weights channels-last for faster CPU inference (the node path). Off, the
        weights stay NCHW, which code that backpropagates through ``backbone`` directly needs (see ``embed_raw``)."""
        target = torch.device(device) if device is not None else next(backbone.parameters()).device
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        # Without channels-last weights, every conv would convert its NCHW weight for channels-last input per call.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        # Folded BatchNorm: same outputs, faster. In place, so the recognizer holds one copy of the weights; the
        # folded weights are made in the final layout, so the .to() calls below copy nothing on CPU in float32.
        self.backbone = fold_batchnorm(backbone.eval(), layout).to(target, dtype).requires_grad_(False)
        self.backbone.to(memory_format=layout)
        self.module = self.backbone  # what a host (ComfyUI's ModelPatcher) moves between devices
        self.name = name or f"arcface_{backbone.config.arch}"
        self.batch_size = int(batch_size)

    def _drop_inference_tensors(self) -> None:
        """Weights made under ``torch.inference_mode`` (ComfyUI loads nodes' models there) cannot be saved for
        backward; an identity loss backpropagates through them, so swap them once for ordinary copies."""
        if not any(t.is_inference() for t in self.backbone.state_dict().values()):
            return
        with torch.inference_mode(False):
            for module in self.backbone.modules():
                for key, param in module._parameters.items():
                    if param is not None and param.is_inference():
                        module._parameters[key] = nn.Parameter(param.clone(), requires_grad=False)
                for key, buffer in module._buffers.items():
                    if buffer is not None and buffer.is_inference():
                        module._buffers[key] = buffer.clone()

    @property
    def device(self) -> torch.device:
        """Where the backbone is now (a host may have moved it since loading)."""
        return next(self.backbone.parameters()).device

    @property
    def embedding_dim(self) -> int:
        return self.backbone.config.num_features

    def embed_raw(self, aligned: torch.Tensor) -> torch.Tensor:
        """Unnormalised backbone output (N, D) in float32."""
        if aligned.dim() == 3:
            aligned = aligned[None]
        if aligned.dim() != 4 or aligned.shape[-1] != 3:
            raise ValueError(f"ArcFace expects aligned crops shaped (N, 112, 112, 3), got {tuple(aligned.shape)}.")
        if tuple(aligned.shape[1:3]) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"ArcFace needs 112x112 crops aligned to the ArcFace 5-point template, got "
                f"{tuple(aligned.shape[1:3])}. Align faces with the 'arcface_112' crop first."
            )
        if not aligned.is_floating_point():
            raise TypeError(f"ArcFace expects float crops in [0, 1], got dtype {aligned.dtype}.")
        outs = []
        device = self.device
        # Inference runs channels-last (the crops already are: (N, H, W, 3) permuted), which is faster on CPU. With
        # autograd, contiguous NCHW: backprop through the convs with channels-last crashes this torch's CPU build.
        grad = torch.is_grad_enabled() and aligned.requires_grad
        if grad:
            self._drop_inference_tensors()
        if grad and self.channels_last:  # backward must not see channels-last weights either: switch once, for good
            logger.info("ArcFace: gradients requested; switching the backbone to NCHW weights")
            self.backbone.to(memory_format=torch.contiguous_format)
            self.channels_last = False
        layout = torch.channels_last if self.channels_last and not grad else torch.contiguous_format
        for start in range(0, aligned.shape[0], self.batch_size):
            x = aligned[start : start + self.batch_size].to(device, self.dtype).permute(0, 3, 1, 2)
            outs.append(self.backbone(((x - 0.5) / 0.5).contiguous(memory_format=layout)).float())
        return torch.cat(outs) if outs else torch.zeros(0, self.embedding_dim, device=self.device)

    def embed(self, aligned: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed_raw(aligned), dim=-1)


def load_arcface(
    path: Union[str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    name: Optional[str] = None,
    channels_last: bool = False,
) -> ArcFaceRecognizer:
    """Load an arcface_torch IResNet ``backbone.pth`` (weights-only) or ``.safetensors``.

    ``channels_last=True`` for inference-only use (faster on CPU); training code keeps the default.

    ``name`` labels the embeddings (identities made by different recognizers never compare); it
    defaults to ``arcface_<arch>``.
    """
    path = require_weight_file(path, "ArcFace", "Put an arcface_torch backbone.pth (or a .safetensors conversion) there.")
    # Read, not memory-mapped: each tensor gets its own buffer, so folding BatchNorm frees the file's tensors layer
    # by layer and loading peaks near one copy of the weights. (A mapped file stays resident until its last tensor
    # goes: the file's pages and the folded copy would both count, twice the weights at the peak.)
    state, _ = load_state_dict_file(path)
    backbone = iresnet_from_state_dict(state, source=str(path))
    del state  # the model now holds the only references: folding can release them
    logger.info("Loaded ArcFace %s from %s", backbone.config.arch, path)
    return ArcFaceRecognizer(backbone, device=device, dtype=dtype, name=name, channels_last=channels_last)

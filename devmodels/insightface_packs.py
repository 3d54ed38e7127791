"""Tiny random-weight insightface packs (antelopev2 / buffalo_l file names), for tests and demos.

insightface routes each ``.onnx`` in a pack by its inputs and outputs (``model_zoo.ModelRouter``):

* 5 or more outputs -> ``SCRFD`` detector. With 9 outputs it uses strides (8, 16, 32), 2 anchors per cell and
  keypoints; output ``i`` is the score (stride ``i``), ``i + 3`` the box distances, ``i + 6`` the keypoint
  offsets, each flattened to (cells * anchors, 1 | 4 | 10) in (row, column, anchor) order. Distances are in
  units of the stride. The input is NCHW with free height and width.
* one output and a square input of 112 (>= 112, multiple of 16) -> ``ArcFaceONNX`` recognizer. Its first
  nodes must not be named ``Sub*``/``Mul*`` or it assumes mxnet-style normalisation.

The detector here is a real convolutional network, but its score head is set by hand so that it fires on
*red* regions (``DETECTOR_FIRES_ON``): tests can place a "face" and check colour order and coordinates.
Box and keypoint heads have random weights. The recognizer (conv -> conv -> flatten -> gemm) is all random.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# The file names of the official packs, so the layout checks see what users have.
PACK_FILES: dict[str, tuple[str, str]] = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}
DETECTOR_FIRES_ON = "red"  # the score head's hand-set colour: R minus the mean of G and B
STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
EMBEDDING_DIM = 512
_OPSET = 13
_IR_VERSION = 8  # readable by onnxruntime releases from 2021 on


def _helpers():
    import onnx
    from onnx import helper, numpy_helper

    return onnx, helper, numpy_helper


def build_recognition_model(seed: int = 0, embedding_dim: int = EMBEDDING_DIM):
    """ArcFace-shaped model: input (N, 3, 112, 112) normalised RGB, output (N, embedding_dim)."""
    onnx, helper, nh = _helpers()
    rng = np.random.default_rng(seed)

    def init(name, shape, fan_in):
        return nh.from_array((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name)

    inits = [
        init("conv1.weight", (16, 3, 4, 4), 3 * 16),
        nh.from_array(np.zeros(16, np.float32), "conv1.bias"),
        init("conv2.weight", (32, 16, 4, 4), 16 * 16),
        nh.from_array(np.zeros(32, np.float32), "conv2.bias"),
        init("fc.weight", (embedding_dim, 32 * 7 * 7), 32 * 7 * 7),
        nh.from_array((rng.standard_normal(embedding_dim) * 0.01).astype(np.float32), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input.1", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", strides=[4, 4]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", strides=[4, 4]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["embedding"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "facebooth_random_arcface",
        [helper.make_tensor_value_info("input.1", onnx.TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["None", embedding_dim])],
        inits,
    )
    return _finish(onnx, helper, graph)


def build_detection_model(seed: int = 0, gain: float = 6.0, threshold: float = 1.0):
    """SCRFD-shaped model: input (1, 3, H, W) normalised RGB, 9 outputs (score, bbox, kps per stride).

    Score at a cell = sigmoid(gain * (redness - threshold) + small random term), redness = R - (G + B) / 2 of
    the cell's mean colour on insightface's (x - 127.5) / 128 scale: about 2 for pure red, 0 for grey, black or
    white. The random term only separates otherwise equal scores.
    """
    onnx, helper, nh = _helpers()
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    scores, boxes, kpss = [], [], []
    redness = np.array([1.0, -0.5, -0.5], np.float32)
    for s in STRIDES:
        p = f"s{s}"
        inits += [
            nh.from_array(np.tile(redness * gain, (NUM_ANCHORS, 1)).reshape(NUM_ANCHORS, 3, 1, 1), f"{p}.score.weight"),
            nh.from_array(np.full(NUM_ANCHORS, -gain * threshold, np.float32), f"{p}.score.bias"),
            nh.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32), f"{p}.feat.weight"),
            nh.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), f"{p}.feat.bias"),
            nh.from_array((rng.standard_normal((NUM_ANCHORS, 8, 1, 1)) * 0.2).astype(np.float32), f"{p}.jitter.weight"),
            nh.from_array((rng.standard_normal((4 * NUM_ANCHORS, 8, 1, 1)) * 0.1).astype(np.float32), f"{p}.bbox.weight"),
            # softplus(3) ~ 3 strides from the anchor centre to each side: neighbouring anchors overlap, NMS merges
            nh.from_array(np.full(4 * NUM_ANCHORS, 3.0, np.float32), f"{p}.bbox.bias"),
            nh.from_array((rng.standard_normal((10 * NUM_ANCHORS, 8, 1, 1)) * 0.3).astype(np.float32), f"{p}.kps.weight"),
            nh.from_array((rng.standard_normal(10 * NUM_ANCHORS) * 0.5).astype(np.float32), f"{p}.kps.bias"),
        ]
        nodes += [
            helper.make_node("AveragePool", ["input.1"], [f"{p}.pool"], name=f"{p}_pool", kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("Conv", [f"{p}.pool", f"{p}.feat.weight", f"{p}.feat.bias"], [f"{p}.f0"], name=f"{p}_feat", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"{p}.f0"], [f"{p}.f"], name=f"{p}_relu"),
            helper.make_node("Conv", [f"{p}.pool", f"{p}.score.weight", f"{p}.score.bias"], [f"{p}.l0"], name=f"{p}_score"),
            helper.make_node("Conv", [f"{p}.f", f"{p}.jitter.weight"], [f"{p}.l1"], name=f"{p}_jitter"),
            helper.make_node("Add", [f"{p}.l0", f"{p}.l1"], [f"{p}.logit"], name=f"{p}_logit"),
            helper.make_node("Sigmoid", [f"{p}.logit"], [f"{p}.prob"], name=f"{p}_sigmoid"),
            helper.make_node("Conv", [f"{p}.f", f"{p}.bbox.weight", f"{p}.bbox.bias"], [f"{p}.b0"], name=f"{p}_bbox"),
            helper.make_node("Softplus", [f"{p}.b0"], [f"{p}.b1"], name=f"{p}_softplus"),
            helper.make_node("Conv", [f"{p}.f", f"{p}.kps.weight", f"{p}.kps.bias"], [f"{p}.k0"], name=f"{p}_kps"),
        ]
        # NCHW -> (cells * anchors, C): channel index = anchor * C + c, matching insightface's anchor order
        for src, width, out in ((f"{p}.prob", 1, f"score_{s}"), (f"{p}.b1", 4, f"bbox_{s}"), (f"{p}.k0", 10, f"kps_{s}")):
            shape_name = f"{p}.shape{width}"
            inits.append(nh.from_array(np.array([-1, width], np.int64), shape_name))
            nodes += [
                helper.make_node("Transpose", [src], [f"{out}.t"], name=f"{out}_transpose", perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [f"{out}.t", shape_name], [out], name=f"{out}_reshape"),
            ]
        scores.append(helper.make_tensor_value_info(f"score_{s}", onnx.TensorProto.FLOAT, [f"n{s}", 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{s}", onnx.TensorProto.FLOAT, [f"n{s}", 4]))
        kpss.append(helper.make_tensor_value_info(f"kps_{s}", onnx.TensorProto.FLOAT, [f"n{s}", 10]))
    graph = helper.make_graph(
        nodes,
        "facebooth_random_scrfd",
        [helper.make_tensor_value_info("input.1", onnx.TensorProto.FLOAT, [1, 3, "?", "?"])],
        scores + boxes + kpss,
        inits,
    )
    return _finish(onnx, helper, graph)


def _finish(onnx, helper, graph):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="facebooth-devmodels")
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    return model


def write_insightface_pack(root: str | Path, pack: str = "antelopev2", seed: int = 0) -> Path:
    """Write a valid random pack to ``<root>/models/<pack>/`` (the layout insightface expects); return that dir.

    ``root`` plays the role of ComfyUI's ``models/insightface`` folder.
    """
    det_name, rec_name = PACK_FILES.get(pack, ("det_10g.onnx", "w600k_r50.onnx"))
    return _write_files(Path(root) / "models" / pack, det_name, rec_name, seed)


def write_nested_mistake(root: str | Path, pack: str = "antelopev2", seed: int = 0) -> Path:
    """The most common user mistake: the zip unpacked one level too deep, ``models/<pack>/<pack>/*.onnx``."""
    det_name, rec_name = PACK_FILES.get(pack, ("det_10g.onnx", "w600k_r50.onnx"))
    return _write_files(Path(root) / "models" / pack / pack, det_name, rec_name, seed)


def write_pack_files(folder: str | Path, pack: str = "antelopev2", seed: int = 0) -> Path:
    """Write the pack's two files into an arbitrary folder (for misplaced-layout tests)."""
    det_name, rec_name = PACK_FILES.get(pack, ("det_10g.onnx", "w600k_r50.onnx"))
    return _write_files(Path(folder), det_name, rec_name, seed)


def _write_files(folder: Path, det_name: str, rec_name: str, seed: int) -> Path:
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(build_detection_model(seed), str(folder / det_name))
    onnx.save(build_recognition_model(seed + 1), str(folder / rec_name))
    return folder




# ----------------------------------------------------------------------------------------------
# Real architectures with random weights (for the speed benchmark, not for tests of behaviour)
# ----------------------------------------------------------------------------------------------
# buffalo_l's det_10g.onnx is SCRFD-10G-KPS and w600k_r50.onnx an IResNet-50. Speed depends on the architecture,
# not the values, so random weights of the same shapes time like the real files. The SCRFD score heads get a
# large negative bias: a random detector then finds nothing instead of thousands of boxes.


def _scrfd_10g_module(seed: int = 0):
    """SCRFD-10G with keypoints, written from its published config: ResNetV1e backbone (deep stem of three 3x3
    convs 28-28-56, basic blocks 3-4-2-3 with widths 56-88-88-224, average-pool shortcuts), a PAFPN neck on the
    stride 8/16/32 features (56 channels) and one head per stride (three 3x3 convs of 80 channels with GroupNorm,
    then 3x3 score / box / keypoint convs for 2 anchors per cell)."""
    import torch
    from torch import nn

    def cbr(cin, cout, stride=1, k=3):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(cbr(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = nn.Identity()
            if stride != 1 or cin != cout:
                pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
                self.skip = nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    class SCRFD10G(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(cbr(3, 28, 2), cbr(28, 28), cbr(28, 56), nn.MaxPool2d(3, 2, 1))
            stages, cin = [], 56
            for i, (blocks, width) in enumerate(zip((3, 4, 2, 3), (56, 88, 88, 224))):
                layers = [Block(cin, width, 1 if i == 0 else 2)] + [Block(width, width, 1) for _ in range(blocks - 1)]
                stages.append(nn.Sequential(*layers))
                cin = width
            self.stages = nn.ModuleList(stages)
            self.lateral = nn.ModuleList(nn.Conv2d(c, 56, 1) for c in (88, 88, 224))
            self.fpn = nn.ModuleList(nn.Conv2d(56, 56, 3, 1, 1) for _ in range(3))
            self.down = nn.ModuleList(nn.Conv2d(56, 56, 3, 2, 1) for _ in range(2))
            self.pafpn = nn.ModuleList(nn.Conv2d(56, 56, 3, 1, 1) for _ in range(2))
            self.heads = nn.ModuleList()
            for _ in STRIDES:
                tower = []
                for j in range(3):
                    tower += [nn.Conv2d(56 if j == 0 else 80, 80, 3, 1, 1), nn.GroupNorm(16, 80), nn.ReLU()]
                head = nn.ModuleDict({
                    "tower": nn.Sequential(*tower),
                    "cls": nn.Conv2d(80, NUM_ANCHORS, 3, 1, 1),
                    "reg": nn.Conv2d(80, 4 * NUM_ANCHORS, 3, 1, 1),
                    "kps": nn.Conv2d(80, 10 * NUM_ANCHORS, 3, 1, 1),
                })
                nn.init.constant_(head["cls"].bias, -12.0)  # random detector: no detections
                self.heads.append(head)

        def forward(self, x):
            feats = []
            x = self.stem(x)
            for stage in self.stages:
                x = stage(x)
                feats.append(x)
            lat = [conv(f) for conv, f in zip(self.lateral, feats[1:])]
            for i in (2, 1):
                lat[i - 1] = lat[i - 1] + nn.functional.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
            outs = [conv(f) for conv, f in zip(self.fpn, lat)]
            for i in range(2):
                outs[i + 1] = outs[i + 1] + self.down[i](outs[i])
            outs = [outs[0]] + [conv(f) for conv, f in zip(self.pafpn, outs[1:])]
            scores, boxes, kpss = [], [], []
            for head, f in zip(self.heads, outs):
                t = head["tower"](f)
                flat = lambda y, c: y.permute(0, 2, 3, 1).reshape(-1, c)  # noqa: E731 (row, col, anchor) order
                scores.append(flat(torch.sigmoid(head["cls"](t)), 1))
                boxes.append(flat(head["reg"](t), 4))
                kpss.append(flat(head["kps"](t), 10))
            return (*scores, *boxes, *kpss)

    torch.manual_seed(seed)
    return SCRFD10G().eval()


def _export_onnx(module, example, path: Path, outputs: list[str], dynamic: dict) -> Path:
    import torch

    from ..utils.files import atomic_write

    def write(tmp: str) -> None:
        torch.onnx.export(module, example, tmp, input_names=["input.1"], output_names=outputs, dynamic_axes=dynamic,
                          opset_version=_OPSET, dynamo=False)

    return atomic_write(path, write)


def write_real_architecture_pack(root: str | Path, arcface_state: dict | None = None, seed: int = 0) -> Path:
    """buffalo_l's layout with SCRFD-10G-KPS (``det_10g.onnx``) and IResNet-50 (``w600k_r50.onnx``) of random weights.

    ``arcface_state``: an arcface_torch IResNet-50 state dict to export (so the PyTorch pipeline can load the same
    weights and the two pipelines' embeddings can be compared); random when None.
    """
    import torch

    from ..pipelines.face.arcface import iresnet, iresnet_from_state_dict

    folder = Path(root) / "models" / "buffalo_l"
    folder.mkdir(parents=True, exist_ok=True)
    det_outputs = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    with torch.no_grad():
        _export_onnx(_scrfd_10g_module(seed), torch.zeros(1, 3, 640, 640), folder / "det_10g.onnx", det_outputs,
                     {"input.1": {2: "h", 3: "w"}, **{o: {0: f"n_{o}"} for o in det_outputs}})
        rec = iresnet_from_state_dict(arcface_state) if arcface_state is not None else iresnet(50)
        _export_onnx(rec.eval(), torch.zeros(1, 3, 112, 112), folder / "w600k_r50.onnx", ["embedding"],
                     {"input.1": {0: "n"}, "embedding": {0: "n"}})
    return folder

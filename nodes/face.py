"""Face-analysis nodes: analyzer loaders, detect/align/embed, identity save/load, ID similarity."""
from __future__ import annotations

import json
import logging
import os

import torch
from comfy_api.latest import io, ui

from ..pipelines.face.analyzer import DEFAULT_DET_SIZE, FaceAnalyzer, cosine_similarity, identity_from_faces
from ..pipelines.face.draw import debug_image, draw_faces, from_pil, pad_to_same_size
from ..pipelines.face.identity_io import load_identity, save_identity
from ..pipelines.face.insightface_backend import PROVIDER_CHOICES
from ..pipelines.face.types import Identity
from ..utils.files import sanitize_name
from . import model_folders
from .common import DEVICE_CHOICES, ModelCache, comfy_hooks, named_file_fingerprint, pick_device, placeholder_image
from .types import FaceAnalyzer as FaceAnalyzerType
from .types import Faces, Identity as IdentityType

log = logging.getLogger(__name__)
CATEGORY = "FaceBooth/Face"
_CACHE = ModelCache()
_NONE = "none"

PROVIDERS = list(PROVIDER_CHOICES)  # one list, the backend's (it imports insightface/onnxruntime only when loading)
SELECT_CHOICES = ["largest", "index", "all (left to right)"]
MODE_CHOICES = ["detect", "aligned crop"]
NO_FACE_CHOICES = {"error": "error", "skip image": "skip", "pass through": "pass_through"}


def _select_policy(label: str) -> str:
    return "all" if label.startswith("all") else label


def empty_identity(dim: int = 512, recognizer: str = "none") -> Identity:
    """An identity with no faces: methods treat it as 'no identity' and pass their input through."""
    return Identity(embedding=torch.zeros(dim), per_face=torch.zeros(0, dim), recognizer=recognizer)


def _mtcnn_folder() -> str | None:
    for root in model_folders.folder_paths_for("facebooth/face"):
        folder = os.path.join(root, "mtcnn")
        if os.path.isdir(folder):
            return folder
    return None


# Sub-folders of models/facebooth/face that hold other face models, never recognizers.
_NOT_RECOGNIZERS = ("mtcnn/", "parsing/", "clipseg/", "retinaface/")
_RETINAFACE = "retinaface (facexlib)"
DETECTOR_CHOICES = ["mtcnn", _RETINAFACE, "none"]


def _retinaface_file() -> str:
    """models/facebooth/face/retinaface/detection_Resnet50_Final.pth (or the one file in that folder)."""
    from ..pipelines.face.retinaface import OFFICIAL_FILE

    files = [f.replace("\\", "/") for f in model_folders.list_files("facebooth/face")]
    found = [f for f in files if f.startswith("retinaface/")]
    official = [f for f in found if f.endswith("/" + OFFICIAL_FILE)]
    if official or len(found) == 1:
        return model_folders.resolve_file("facebooth/face", (official or found)[0])
    roots = ", ".join(model_folders.folder_paths_for("facebooth/face"))
    what = f"several files ({', '.join(found)}); keep only {OFFICIAL_FILE}" if found else f"no {OFFICIAL_FILE}"
    raise FileNotFoundError(
        f"FaceBooth: RetinaFace weights: the 'retinaface' folder holds {what}. Put facexlib's {OFFICIAL_FILE} "
        f"(https://github.com/xinntao/facexlib/releases/download/v0.1.0/{OFFICIAL_FILE}) in a 'retinaface' folder inside "
        f"one of: {roots}."
    )


def _patchers(modules: list, device: torch.device) -> list:
    """ComfyUI ModelPatchers for our face models: load_models_gpu places them, unloading / freeing memory evicts them."""
    import comfy.model_management as mm
    import comfy.model_patcher

    offload = torch.device("cpu") if device.type == "cpu" else mm.unet_offload_device()
    return [comfy.model_patcher.ModelPatcher(m, load_device=device, offload_device=offload) for m in modules]


def _managed(analyzer: FaceAnalyzer, device: torch.device) -> FaceAnalyzer:
    """Wrap every torch module of the analyzer in a ModelPatcher; the analyzer loads them before each use."""
    import comfy.model_management as mm

    modules = [getattr(part, "module", None) for part in (analyzer.detector, analyzer.recognizer, analyzer.parser)]
    patchers = _patchers([m for m in modules if isinstance(m, torch.nn.Module)], device)
    analyzer.patchers = patchers  # type: ignore[attr-defined]  # kept with the analyzer for hosts and tests
    if patchers:
        analyzer.prepare = lambda: mm.load_models_gpu(patchers)
    return analyzer


def _recognizer_files() -> list[str]:
    files = [f.replace("\\", "/") for f in model_folders.list_files("facebooth/face")]
    return [f for f in files if not f.startswith(_NOT_RECOGNIZERS)]


def _parser_files() -> list[str]:
    files = [f.replace("\\", "/") for f in model_folders.list_files("facebooth/face")]
    return [f for f in files if f.startswith("parsing/")]


_HULL = "none (landmark hull)"


def _parser_input() -> io.Combo.Input:
    return io.Combo.Input(
        "face_parser",
        options=_parser_files() + [_HULL],
        default=_HULL,
        tooltip="Optional BiSeNet face-parsing model (facexlib's parsing_bisenet.pth in models/facebooth/face/parsing/; needs `pip install facexlib`) "
        "for precise face masks. Without it the mask is a face oval placed by the 5 landmarks.",
    )


def _load_parser(name: str, device: torch.device):
    if name == _HULL:
        return None
    from ..pipelines.face.parsing import load_bisenet

    # Built on the CPU; the analyzer's ModelPatcher moves it to ``device`` when it runs.
    return load_bisenet(model_folders.resolve_file("facebooth/face", name), device="cpu")


class FaceAnalyzerTorch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothFaceAnalyzerTorch",
            display_name="Face Analyzer (PyTorch)",
            category=CATEGORY,
            description="Face detection (MTCNN, or facexlib's RetinaFace) and recognition (ArcFace) in PyTorch: needs neither "
            "insightface nor onnxruntime. Weights go in models/facebooth/face (see `python -m facebooth weights list`).",
            inputs=[
                io.Combo.Input(
                    "detector",
                    options=DETECTOR_CHOICES,
                    default="mtcnn",
                    tooltip="MTCNN finds faces and their 5 landmarks; weights in models/facebooth/face/mtcnn/"
                    "{pnet,rnet,onet}.pt. RetinaFace (needs `pip install facexlib`) uses facexlib's detection_Resnet50_Final.pth "
                    "in models/facebooth/face/retinaface/, the file PuLID and PhotoMaker V2 use. 'none' only allows the 'aligned crop' mode.",
                ),
                io.Combo.Input(
                    "recognizer",
                    options=_recognizer_files() + [_NONE],
                    tooltip="ArcFace backbone (arcface_torch iresnet .pth or our .safetensors) from models/facebooth/face. "
                    "It turns a face into the identity embedding. 'none' disables identities.",
                ),
                _parser_input(),
                io.Int.Input("min_face_size", default=20, min=8, max=512, tooltip="MTCNN: smallest face, in pixels of the detection image (see det_size), the detector looks for. Larger is faster."),
                io.Combo.Input("device", options=DEVICE_CHOICES, default="auto", tooltip="Where the face models run. 'auto' uses ComfyUI's device."),
                io.Int.Input("det_size", default=DEFAULT_DET_SIZE, min=0, max=4096, optional=True,
                             tooltip="Detection size: photos are shrunk to this many pixels on the long side for detection only (like insightface's "
                             "det_size); crops still come from the full photo. Larger finds smaller faces but costs more; 0 = full size (up to 1600)."),
            ],
            outputs=[FaceAnalyzerType.Output(display_name="face_analyzer", tooltip="Connect to Detect Faces or ID Similarity.")],
        )

    @classmethod
    def fingerprint_inputs(cls, recognizer: str = "", face_parser: str = "", **kwargs):
        """The files read by name: a rewritten recognizer or parser file is loaded again."""
        return (named_file_fingerprint("facebooth/face", recognizer), named_file_fingerprint("facebooth/face", face_parser), kwargs)

    @classmethod
    def execute(cls, detector: str, recognizer: str, face_parser: str, min_face_size: int, device: str,
                det_size: int = DEFAULT_DET_SIZE) -> io.NodeOutput:
        dev = pick_device(device)

        def load() -> FaceAnalyzer:
            det = rec = None
            if detector == _RETINAFACE:
                from ..pipelines.face.retinaface import load_retinaface

                det = load_retinaface(_retinaface_file())
            if detector == "mtcnn":
                from ..pipelines.face.mtcnn import load_mtcnn

                folder = _mtcnn_folder()
                if folder is None:
                    roots = ", ".join(model_folders.folder_paths_for("facebooth/face"))
                    raise FileNotFoundError(
                        f"FaceBooth: MTCNN weights not found. Put pnet.pt, rnet.pt and onet.pt in a 'mtcnn' folder "
                        f"inside one of: {roots} (python -m facebooth weights fetch --method face)."
                    )
                det = load_mtcnn(folder, device="cpu", min_face_size=min_face_size)
            if recognizer != _NONE:
                from ..pipelines.face.arcface import load_arcface

                rec = load_arcface(model_folders.resolve_file("facebooth/face", recognizer), device="cpu", name=f"arcface:{recognizer}",
                                   channels_last=True)  # inference only here
            parser = _load_parser(face_parser, dev)
            analyzer = FaceAnalyzer(detector=det, recognizer=rec, parser=parser, name=f"torch:{detector}+{recognizer}", det_size=det_size)
            return _managed(analyzer, dev)  # the models live on the CPU until ComfyUI loads them for a run

        files = cls.fingerprint_inputs(recognizer=recognizer, face_parser=face_parser)[:2]
        key = ("torch", detector, files, min_face_size, str(dev), det_size)
        return io.NodeOutput(_CACHE.get(key, load))


class FaceAnalyzerInsightFace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        try:
            from ..pipelines.face.insightface_layout import list_packs

            packs = list_packs(model_folders.folder_paths_for("insightface")) or ["antelopev2", "buffalo_l"]
        except Exception:  # listing must never break the node list
            packs = ["antelopev2", "buffalo_l"]
        return io.Schema(
            node_id="FaceBoothFaceAnalyzerInsightFace",
            display_name="Face Analyzer (InsightFace)",
            category=CATEGORY,
            description="Face detection and ArcFace recognition with an insightface model pack "
            "(models/insightface/models/<pack>/*.onnx, honouring extra_model_paths.yaml). Needs `pip install insightface onnxruntime`.",
            inputs=[
                io.Combo.Input("pack", options=packs, tooltip="Model pack folder under models/insightface/models/. antelopev2 (glintr100) or buffalo_l (w600k_r50)."),
                io.Combo.Input("provider", options=PROVIDERS, default="CPU", tooltip="onnxruntime execution provider. Falls back to CPU, with a warning, when unavailable."),
                _parser_input(),
                io.Int.Input("det_size", default=640, min=128, max=1280, step=32, tooltip="Detector input size. Smaller finds big faces faster; larger finds small faces."),
            ],
            outputs=[FaceAnalyzerType.Output(display_name="face_analyzer", tooltip="Connect to Detect Faces or ID Similarity.")],
        )

    @classmethod
    def execute(cls, pack: str, provider: str, face_parser: str, det_size: int) -> io.NodeOutput:
        def load() -> FaceAnalyzer:
            from ..pipelines.face.insightface_backend import InsightFaceBackend

            backend = InsightFaceBackend(model_folders.folder_paths_for("insightface"), pack=pack, providers=[provider], det_size=det_size)
            for warning in getattr(backend, "warnings", []):
                log.warning("FaceBooth: %s", warning)
            dev = pick_device("auto")
            parser = _load_parser(face_parser, dev)
            analyzer = FaceAnalyzer(detector=backend, recognizer=backend, parser=parser, name=f"insightface:{pack}", det_size=det_size)
            return _managed(analyzer, dev)

        return io.NodeOutput(_CACHE.get(("insightface", pack, provider, face_parser, det_size), load))


class DetectFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothDetectFaces",
            display_name="Detect Faces",
            category=CATEGORY,
            description="Finds faces, aligns them (ArcFace 112, CLIP 224, FFHQ 512 crops), masks them and computes the "
            "identity embedding. Several photos of one person are averaged into one identity.",
            inputs=[
                FaceAnalyzerType.Input("face_analyzer", tooltip="From a Face Analyzer loader node."),
                io.Image.Input("image", tooltip="One or more photos. RGBA and grayscale are accepted."),
                io.Combo.Input("mode", options=MODE_CHOICES, default="detect", tooltip="'detect' finds faces; 'aligned crop' treats each image as an already aligned face crop and skips detection."),
                io.Combo.Input("which_face", options=SELECT_CHOICES, default="largest", tooltip="Which face to use when an image has several."),
                io.Int.Input("face_index", default=0, min=0, max=64, tooltip="With 'index': which face, counted from the left, starting at 0."),
                io.Combo.Input("no_face", options=list(NO_FACE_CHOICES), default="error", tooltip="What to do with an image without a face: stop with an error naming it, skip it, or pass through (downstream nodes then leave their input unchanged)."),
            ],
            outputs=[
                Faces.Output(display_name="faces", tooltip="Detected faces with crops, masks and embeddings, for the method nodes."),
                IdentityType.Output(display_name="identity", tooltip="The person's identity: ArcFace embeddings averaged over all faces. Save it with Save Identity."),
                io.Image.Output(display_name="aligned_faces", tooltip="The aligned 224×224 face crops, one per face."),
                io.Mask.Output(display_name="face_mask", tooltip="Face region per input image (parsing model when present, landmark hull otherwise)."),
                io.Image.Output(display_name="debug", tooltip="Each input with boxes, landmarks and scores, and the aligned crops underneath."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, face_analyzer: FaceAnalyzer, image: torch.Tensor, mode: str, which_face: str, face_index: int, no_face: str) -> io.NodeOutput:
        n = image.shape[0] if image.dim() == 4 else 1
        faceset = face_analyzer.analyze(
            image,
            mode="aligned" if mode == "aligned crop" else "detect",
            select=_select_policy(which_face),
            index=face_index,
            no_face=NO_FACE_CHOICES[no_face],
            hooks=comfy_hooks(n, cls.hidden.unique_id),
        )
        identity = identity_from_faces(faceset, face_analyzer.recognizer_name) or empty_identity(recognizer=face_analyzer.recognizer_name)
        crops = faceset.crops("clip_224") if faceset.faces else placeholder_image(224)
        h, w = faceset.images.shape[1:3]
        masks = torch.zeros(faceset.images.shape[0], h, w)
        for f in faceset.faces:
            f.paste_mask(masks[f.image_index])  # only the face's window is computed
        debug = pad_to_same_size(
            [debug_image(faceset.images[i], faceset.for_image(i), missing=i in faceset.missing) for i in range(faceset.images.shape[0])]
        )
        log.info("FaceBooth: %d face(s) in %d image(s); %d without a face", len(faceset.faces), n, len(faceset.missing))
        return io.NodeOutput(faceset, identity, crops, masks, debug)


class SaveIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothSaveIdentity",
            display_name="Save Identity",
            category=CATEGORY,
            description="Saves an identity embedding to models/facebooth/identities/<name>.safetensors for reuse.",
            inputs=[
                IdentityType.Input("identity", tooltip="From Detect Faces."),
                io.String.Input("name", default="person", tooltip="File name (no folders). Letters, digits, '-', '_' and '.'."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of the same name. Off: stop with an error instead."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, identity: Identity, name: str, overwrite: bool) -> io.NodeOutput:
        if identity.count == 0:
            raise ValueError("This identity has no faces (none were found), so there is nothing to save. Check the Detect Faces debug output.")
        safe = sanitize_name(name, what="identity name")
        path = os.path.join(model_folders.writable_folder("facebooth/identities"), f"{safe}.safetensors")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"An identity named '{safe}' already exists ({path}). Choose another name or turn on 'overwrite'.")
        save_identity(identity, path)
        return io.NodeOutput(path, ui=ui.PreviewText(f"saved {safe} ({identity.count} face(s), {identity.recognizer})"))


class LoadIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothLoadIdentity",
            display_name="Load Identity",
            category=CATEGORY,
            description="Loads an identity saved by Save Identity from models/facebooth/identities.",
            inputs=[io.Combo.Input("identity_file", options=model_folders.list_files("facebooth/identities"), tooltip="A .safetensors identity file.")],
            outputs=[IdentityType.Output(display_name="identity", tooltip="The saved identity embedding.")],
        )

    @classmethod
    def fingerprint_inputs(cls, identity_file: str = "", **kwargs):
        return named_file_fingerprint("facebooth/identities", identity_file)  # Save Identity may rewrite it

    @classmethod
    def execute(cls, identity_file: str) -> io.NodeOutput:
        return io.NodeOutput(load_identity(model_folders.resolve_file("facebooth/identities", identity_file)))


class IDSimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothIDSimilarity",
            display_name="ID Similarity",
            category=CATEGORY,
            description="Cosine similarity between a reference identity and every face found in the images, "
            "e.g. generated ones. ArcFace cosines above ~0.4 usually mean the same person (for real weights).",
            inputs=[
                FaceAnalyzerType.Input("face_analyzer", tooltip="Must use the same recognizer that made the reference identity."),
                IdentityType.Input("reference", tooltip="The identity to compare against (Detect Faces or Load Identity)."),
                io.Image.Input("images", tooltip="Images to score, e.g. a sampler's decoded output."),
                io.Combo.Input("mode", options=MODE_CHOICES, default="detect", tooltip="'aligned crop' scores each whole image as an aligned face."),
            ],
            outputs=[
                io.Float.Output(display_name="similarities", tooltip="One cosine per face found, image by image, left to right.", is_output_list=True),
                io.Float.Output(display_name="mean", tooltip="Mean cosine over all faces found (0 when none)."),
                io.Image.Output(display_name="annotated", tooltip="The images with each face boxed and labelled with its cosine."),
            ],
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, face_analyzer: FaceAnalyzer, reference: Identity, images: torch.Tensor, mode: str) -> io.NodeOutput:
        if reference.count == 0:
            raise ValueError("The reference identity has no faces. Check the Detect Faces node that produced it.")
        if reference.recognizer != face_analyzer.recognizer_name:
            raise ValueError(
                f"The reference identity was made by '{reference.recognizer}' but this analyzer uses "
                f"'{face_analyzer.recognizer_name}'. Embeddings of different recognizers cannot be compared: use the same analyzer."
            )
        n = images.shape[0] if images.dim() == 4 else 1
        faceset = face_analyzer.analyze(
            images, mode="aligned" if mode == "aligned crop" else "detect", select="all", no_face="skip",
            crops=("arcface_112",), hooks=comfy_hooks(n, cls.hidden.unique_id),
        )
        scores: list[float] = []
        report = []
        annotated = []
        for i in range(faceset.images.shape[0]):
            faces = faceset.for_image(i)
            sims = cosine_similarity(reference, torch.stack([f.embedding for f in faces])).tolist() if faces else []
            scores.extend(sims)
            report.extend({"image": i, "face": k, "box": [round(v, 1) for v in f.box], "cosine": round(s, 4)} for k, (f, s) in enumerate(zip(faces, sims)))
            annotated.append(from_pil(draw_faces(faceset.images[i], faces, labels=[f"{s:.3f}" for s in sims], missing=not faces)))
        mean = sum(scores) / len(scores) if scores else 0.0
        if not scores:
            log.warning("FaceBooth ID Similarity: no face found in any of the %d image(s)", n)
        text = json.dumps({"mean": round(mean, 4), "faces": report})
        return io.NodeOutput(scores, mean, pad_to_same_size(annotated), ui=ui.PreviewText(text))


NODES = [FaceAnalyzerTorch, FaceAnalyzerInsightFace, DetectFaces, SaveIdentity, LoadIdentity, IDSimilarity]

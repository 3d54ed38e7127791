"""weights_manifest.json and utils/manifest.py: the real manifest validates, bad manifests fail with clear
errors, entries resolve to paths (extra_model_paths included)."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from facebooth.utils.manifest import (
    DEFAULT_MANIFEST_PATH,
    KNOWN_METHODS,
    ManifestError,
    ModelDirs,
    find_pattern_files,
    load_extra_model_paths,
    load_manifest,
    parse_manifest,
    resolve_entry,
)


# ------------------------------------------------------------------------------------------------ the real manifest


def test_real_manifest_validates_and_covers_every_method():
    m = load_manifest()
    assert [g.name for g in m.groups] == list(KNOWN_METHODS)
    for g in m.groups:
        assert g.entries, f"method {g.name} lists no weights"
    ids = [e.id for e in m.entries]
    assert len(ids) == len(set(ids))
    # Every entry is obtainable somehow: a URL, manual instructions or our own producer.
    for e in m.entries:
        assert e.url or e.manual or e.produced_by, e.id


def test_real_manifest_face_backends_are_alternatives():
    m = load_manifest()
    options = {e.choice for e in m.entries if e.one_of == "face_backend"}
    assert {"antelopev2", "buffalo_l", "torch"} <= options


def test_real_manifest_insightface_packs_unpack_into_models_pack_folder():
    m = load_manifest()
    for pack, required in (("antelopev2", {"scrfd_10g_bnkps.onnx", "glintr100.onnx"}),
                           ("buffalo_l", {"det_10g.onnx", "w600k_r50.onnx"})):
        e = m.get(pack)
        assert e.folder == "insightface" and e.archive == "zip"
        assert e.extract_to == f"models/{pack}"
        assert e.url.endswith(f"/{pack}.zip")
        assert {f.name for f in e.files if f.required} == required
        assert all(rel == f"models/{pack}/{spec.name}" for rel, spec in e.targets())
        assert e.archive_name == f"{pack}.zip"


def test_real_manifest_mtcnn_entries_match_facenet_pytorch_data_files():
    # Independent source: the pnet/rnet/onet files shipped inside the facenet-pytorch package.
    # Located without importing it (the import pulls in torchvision and takes seconds).
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("facenet-pytorch is not installed")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    m = load_manifest()
    for net in ("pnet", "rnet", "onet"):
        e = m.get(f"mtcnn-{net}")
        blob = (data / f"{net}.pt").read_bytes()
        assert e.size == len(blob)
        assert e.sha256 == hashlib.sha256(blob).hexdigest()
        assert e.subfolder == "mtcnn" and e.filename == f"{net}.pt"


def test_real_manifest_manual_entries_have_no_url_and_a_path_placeholder():
    m = load_manifest()
    manual = [e for e in m.entries if e.url is None and not e.produced_by]
    assert {"face2diffusion-msid", "face2diffusion-mapping", "arcface-ms1mv3-r100"} <= {e.id for e in manual}
    for e in manual:
        assert "{path}" in e.manual, e.id


def test_method_selection_includes_dependencies():
    m = load_manifest()
    assert m.methods_with_dependencies(["portraitbooth"]) == ["face", "portraitbooth"]
    assert m.methods_with_dependencies(["cross_init"]) == ["cross_init"]
    with pytest.raises(KeyError, match="Unknown method"):
        m.methods_with_dependencies(["dreambooth"])


# ------------------------------------------------------------------------------------------------ bad manifests

_GOOD = {
    "schema_version": 1,
    "methods": {
        "face": {
            "description": "faces",
            "entries": [
                {"id": "det", "methods": ["face"], "folder": "facebooth/face", "filename": "det.pt",
                 "url": "https://example.invalid/det.pt", "size": 10, "sha256": "a" * 64,
                 "license": "MIT", "required": True},
                {"id": "pack", "methods": ["face"], "folder": "insightface", "archive": "zip",
                 "extract_to": "models/pack", "url": "https://example.invalid/pack.zip",
                 "files": [{"name": "a.onnx", "size": 3, "sha256": None}], "license": "research", "required": True},
            ],
        },
        "cross_init": {
            "description": "ci",
            "entries": [
                {"id": "emb", "methods": ["cross_init"], "folder": "embeddings", "pattern": "*.safetensors",
                 "produced_by": "us", "license": "yours", "required": False},
            ],
        },
    },
}


def _bad(mutate):
    data = copy.deepcopy(_GOOD)
    mutate(data)
    return data


def _face(data, i=0):
    return data["methods"]["face"]["entries"][i]


BAD_CASES = [
    ("unknown folder", lambda d: _face(d).update(folder="models/face"), ["'det'", "folder must be one of"]),
    ("short sha256", lambda d: _face(d).update(sha256="abc"), ["'det'", "sha256", "64 lowercase hex"]),
    ("upper-case sha256", lambda d: _face(d).update(sha256="A" * 64), ["sha256"]),
    ("url null, no manual", lambda d: _face(d).update(url=None), ["'det'", "manual"]),
    ("duplicate id", lambda d: _face(d, 1).update(id="det"), ["duplicate id"]),
    ("archive without files", lambda d: _face(d, 1).pop("files"), ["'pack'", "files"]),
    ("extract_to traversal", lambda d: _face(d, 1).update(extract_to="../pack"), ["'pack'", "extract_to", ".."]),
    ("absolute subfolder", lambda d: _face(d).update(subfolder="/etc"), ["'det'", "subfolder", "relative"]),
    ("filename with folder", lambda d: _face(d).update(filename="x/det.pt"), ["filename", "plain file name"]),
    ("typo field", lambda d: _face(d).update(sha265="a" * 64), ["unknown field 'sha265'"]),
    ("group not in methods", lambda d: _face(d).update(methods=["cross_init"]), ["must include the group"]),
    ("unknown method group", lambda d: d["methods"].update(dreambooth={"description": "", "entries": []}),
     ["unknown method 'dreambooth'"]),
    ("negative size", lambda d: _face(d).update(size=-5), ["size", "positive integer"]),
    ("string size", lambda d: _face(d).update(size="10 MB"), ["size"]),
    ("pattern on a download", lambda d: (_face(d).pop("filename"), _face(d).update(pattern="*.pt")),
     ["pattern is only for produced files"]),
    ("produced with url", lambda d: d["methods"]["cross_init"]["entries"][0].update(url="https://x.invalid/a"),
     ["produced file has no url"]),
    ("one_of with one option", lambda d: _face(d).update(one_of="backend"), ["one_of group 'backend'", "at least two"]),
    ("wrong schema version", lambda d: d.update(schema_version=2), ["schema_version must be 1"]),
    ("required not bool", lambda d: _face(d).update(required="yes"), ["required must be true or false"]),
    ("archive member traversal", lambda d: _face(d, 1)["files"][0].update(name="../a.onnx"), ["name", "plain file name"]),
]


@pytest.mark.parametrize("name,mutate,needles", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_manifest_gives_clear_error(name, mutate, needles):
    parse_manifest(copy.deepcopy(_GOOD))  # the base case itself is valid
    with pytest.raises(ManifestError) as info:
        parse_manifest(_bad(mutate), source="test.json")
    msg = str(info.value)
    assert "test.json" in msg and "docs/weights_manifest.md" in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in:\n{msg}"


def test_all_problems_are_reported_at_once():
    def several(d):
        _face(d).update(sha256="xyz", folder="nowhere")
        _face(d, 1).update(extract_to="/abs")
    with pytest.raises(ManifestError) as info:
        parse_manifest(_bad(several))
    assert len(info.value.problems) >= 3


def test_invalid_json_file(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('{"schema_version": 1,', encoding="utf-8")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(p)
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "absent.json")


def test_default_manifest_path_is_the_repo_file():
    assert DEFAULT_MANIFEST_PATH.name == "weights_manifest.json" and DEFAULT_MANIFEST_PATH.is_file()
    json.loads(DEFAULT_MANIFEST_PATH.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ resolution


def test_resolve_entry_prefers_models_dir_then_extra_dirs(tmp_path):
    m = parse_manifest(copy.deepcopy(_GOOD))
    det = m.get("det")
    models = tmp_path / "models"
    extra = tmp_path / "elsewhere" / "face"
    dirs = ModelDirs(models, {"facebooth/face": [str(extra)]})

    (rf,) = resolve_entry(det, dirs)
    assert rf.path is None and rf.default_path == models / "facebooth" / "face" / "det.pt"

    extra.mkdir(parents=True)
    (extra / "det.pt").write_bytes(b"x")
    (rf,) = resolve_entry(det, dirs)
    assert rf.path == extra / "det.pt"

    (models / "facebooth" / "face").mkdir(parents=True)
    (models / "facebooth" / "face" / "det.pt").write_bytes(b"y")
    (rf,) = resolve_entry(det, dirs)
    assert rf.path == models / "facebooth" / "face" / "det.pt"

    pack = m.get("pack")
    (rf,) = resolve_entry(pack, dirs)
    assert rf.default_path == models / "insightface" / "models" / "pack" / "a.onnx"


def test_find_pattern_files_is_recursive_and_skips_hidden(tmp_path):
    m = parse_manifest(copy.deepcopy(_GOOD))
    emb = m.get("emb")
    root = tmp_path / "models" / "embeddings"
    (root / "sub").mkdir(parents=True)
    (root / "a.safetensors").write_bytes(b"1")
    (root / "sub" / "b.safetensors").write_bytes(b"2")
    (root / ".c.safetensors.tmp").write_bytes(b"3")
    (root / "d.pt").write_bytes(b"4")
    found = find_pattern_files(emb, ModelDirs(tmp_path / "models"))
    assert sorted(p.name for p in found) == ["a.safetensors", "b.safetensors"]


def test_load_extra_model_paths_follows_comfyui_rules(tmp_path):
    (tmp_path / "cfg").mkdir()
    y = tmp_path / "cfg" / "extra_model_paths.yaml"
    y.write_text(
        "mine:\n"
        "  base_path: ../shared\n"
        "  is_default: true\n"
        "  insightface: models/insightface\n"
        "  clip_vision: |\n"
        "    clipv/a\n"
        "    clipv/b\n"
        "other:\n"
        "  embeddings: /abs/emb\n"
        "empty:\n",
        encoding="utf-8",
    )
    got = load_extra_model_paths(y)
    shared = (tmp_path / "shared").resolve()
    assert got["insightface"] == [str(shared / "models" / "insightface")]
    assert got["clip_vision"] == [str(shared / "clipv" / "a"), str(shared / "clipv" / "b")]
    assert got["embeddings"] == ["/abs/emb"]
    assert "is_default" not in got and "base_path" not in got

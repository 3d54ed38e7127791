"""Where an insightface model pack lives, and what is wrong when it is not where insightface looks.

insightface's ``FaceAnalysis(name=PACK, root=ROOT)`` loads every ``.onnx`` in ``ROOT/models/PACK/``. ComfyUI
users keep packs in ``models/insightface`` (our ``insightface`` model folder, extra_model_paths.yaml included),
so a correct antelopev2 is ``models/insightface/models/antelopev2/scrfd_10g_bnkps.onnx`` and ROOT is
``models/insightface``. The mistakes users make most, each explained with the command that fixes it:

* the zip unpacked one level too deep: ``models/insightface/models/antelopev2/antelopev2/*.onnx``
  (insightface then fails with ``assert 'detection' in self.models``);
* the pack directly under ``models/insightface`` without the ``models/`` level;
* the zip never unpacked, files missing, or files empty / cut short by an interrupted download.

No insightface import here: this runs when the pack is not even installed.
"""
from __future__ import annotations

import fnmatch
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ...utils.files import BadNameError, sanitize_name


DETECTION_PATTERNS = ("scrfd_*.onnx", "det_*.onnx")
RECOGNITION_PATTERNS = ("glintr100*.onnx", "w600k_*.onnx")
DEFAULT_PACKS = ("antelopev2", "buffalo_l")


@dataclass(frozen=True)
class PackInfo:
    detection: str
    recognition: str
    manifest_id: str  # entry in weights_manifest.json
    download: str  # where users get it


_RELEASES = "https://github.com/deepinsight/insightface/releases/download/v0.7/"
KNOWN_PACKS: dict[str, PackInfo] = {
    # manifest ids as in weights_manifest.json ("" = not listed there)
    "antelopev2": PackInfo("scrfd_10g_bnkps.onnx", "glintr100.onnx", "antelopev2", _RELEASES + "antelopev2.zip"),
    "buffalo_l": PackInfo("det_10g.onnx", "w600k_r50.onnx", "buffalo_l", _RELEASES + "buffalo_l.zip"),
    "buffalo_m": PackInfo("det_2.5g.onnx", "w600k_r50.onnx", "", _RELEASES + "buffalo_m.zip"),
    "buffalo_s": PackInfo("det_500m.onnx", "w600k_mbf.onnx", "", _RELEASES + "buffalo_s.zip"),
    "buffalo_sc": PackInfo("det_500m.onnx", "w600k_mbf.onnx", "", _RELEASES + "buffalo_sc.zip"),
}


class InsightFacePackError(FileNotFoundError):
    """An insightface pack is missing, misplaced or broken. The message says how to fix it."""


@dataclass
class PackLocation:
    """A usable pack: ``FaceAnalysis(name=pack, root=root)`` finds it in ``pack_dir``."""

    pack: str
    root: str  # ROOT for insightface (``root/models/pack`` is pack_dir)
    pack_dir: str
    detection: Optional[str]  # file names inside pack_dir (None for manifest-described packs)
    recognition: Optional[str]


@dataclass
class _Diagnosis:
    severity: int  # higher = more specific, shown first
    text: str


@dataclass
class _DirCheck:
    onnx: list[str] = field(default_factory=list)
    detection: Optional[str] = None
    recognition: Optional[str] = None
    broken: list[str] = field(default_factory=list)  # "name: problem"
    has_manifest: bool = False
    check_roles: bool = True  # official packs: require the detector/recognizer by file name

    @property
    def roles_ok(self) -> bool:
        # insightface routes models by their inputs/outputs, not names, so custom packs are only checked
        # for readable files here; the backend reports a missing task after loading
        return self.has_manifest or not self.check_roles or (self.detection is not None and self.recognition is not None)

    @property
    def complete(self) -> bool:
        return not self.broken and bool(self.onnx) and self.roles_ok


def _check_pack_name(pack: str) -> str:
    """A pack name is one folder name: refuse paths rather than guess."""
    try:
        clean = sanitize_name(pack, what="insightface pack name")
    except BadNameError:
        clean = None
    if clean is None or clean != str(pack).strip():
        raise InsightFacePackError(
            f"The insightface pack name {pack!r} is not a plain folder name. Give just the pack folder's name, "
            f"for example {' or '.join(repr(p) for p in DEFAULT_PACKS)}; the folder is looked up in the "
            "insightface model folders."
        )
    return clean


def _first_match(names: Sequence[str], patterns: Sequence[str]) -> Optional[str]:
    # insightface keeps the first model per task in sorted order; do the same so we name the file it uses
    for name in sorted(names):
        if any(fnmatch.fnmatch(name.lower(), p) for p in patterns):
            return name
    return None


def _onnx_names(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".onnx" and p.is_file())
    except OSError:
        return []


def _check_dir(folder: Path, pack: str) -> _DirCheck:
    check = _DirCheck(
        onnx=_onnx_names(folder), has_manifest=(folder / "manifest.json").is_file(), check_roles=pack in KNOWN_PACKS
    )
    for name in check.onnx:
        problem = onnx_file_problem(folder / name)
        if problem:
            check.broken.append(f"{name}: {problem}")
    check.detection = _first_match(check.onnx, DETECTION_PATTERNS)
    check.recognition = _first_match(check.onnx, RECOGNITION_PATTERNS)
    return check


def _read_varint(f) -> Optional[int]:
    value, shift = 0, 0
    for _ in range(10):
        b = f.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
    return None


def onnx_file_problem(path: str | os.PathLike) -> Optional[str]:
    """Why ``path`` cannot be an intact ONNX model, or None if it looks intact.

    Cheap enough for every file of every pack: it walks only the top-level protobuf fields (seeking over
    their contents), so a download cut short shows up as a field that runs past the end of the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:
        return "is empty (0 bytes): the download or unzip did not finish. Download it again"
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head.startswith(b"version https://git-lfs"):
                return "is a Git LFS pointer, not the model. Download the real file (use the 'download' link)"
            if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
                return "is a web page, not the model. Download the real file again"
            f.seek(0)
            seen_graph = False
            for _ in range(100_000):
                if f.tell() >= size:
                    break
                tag = _read_varint(f)
                if tag is None:
                    return _truncated(size)
                field_no, wire = tag >> 3, tag & 7
                if field_no == 0 or wire not in (0, 1, 2, 5):
                    return "is not an ONNX model (unreadable content). Download it again"
                if wire == 0:
                    if _read_varint(f) is None:
                        return _truncated(size)
                    continue
                length = 8 if wire == 1 else 4 if wire == 5 else _read_varint(f)
                if length is None or f.tell() + length > size:
                    return _truncated(size)
                seen_graph = seen_graph or field_no == 7  # ModelProto.graph
                f.seek(length, os.SEEK_CUR)
            if not seen_graph:
                return "is not an ONNX model (it has no graph). Download it again"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def _truncated(size: int) -> str:
    return f"is truncated ({size:,} bytes, the file ends inside the model): the download was cut short. Download it again"


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _nested_dirs(pack_dir: Path) -> list[Path]:
    try:
        subs = sorted(p for p in pack_dir.iterdir() if p.is_dir())
    except OSError:
        return []
    return [p for p in subs if _onnx_names(p)]


def _diagnose_root(root: Path, pack: str) -> tuple[Optional[PackLocation], list[_Diagnosis]]:
    """Look for ``pack`` under one ``models/insightface`` folder."""
    diags: list[_Diagnosis] = []
    candidates = [(root, root / "models" / pack)]
    if root.name == "models":  # the folder itself is insightface's models/ level: ROOT is its parent
        candidates.append((root.parent, root / pack))
    for ins_root, pack_dir in candidates:
        if not pack_dir.is_dir():
            continue
        check = _check_dir(pack_dir, pack)
        if check.complete:
            return PackLocation(pack, str(ins_root), str(pack_dir), check.detection, check.recognition), []
        nested = _nested_dirs(pack_dir)
        if nested:
            sub = nested[0]
            diags.append(_Diagnosis(50 if not check.onnx else 45, (
                f"The '{pack}' files are one folder too deep: they are in {sub}{os.sep}, but insightface looks in "
                f"{pack_dir}{os.sep} (the zip was unpacked into an extra folder). Move them up one level:\n"
                f"  mv {_q(sub)}/* {_q(pack_dir)}/ && rmdir {_q(sub)}"
                + (f'\n  (Windows: move "{sub}\\*" "{pack_dir}\\" then rmdir "{sub}")' if os.name == "nt" else "")
            )))
        if check.onnx or not nested:
            diags.append(_Diagnosis(60, _explain_incomplete(pack, pack_dir, check)))

    # the pack straight under models/insightface, without the models/ level insightface adds
    flat = root / pack
    if root.name != "models" and flat.is_dir():
        inner = flat if _onnx_names(flat) else next(iter(_nested_dirs(flat)), None)
        if inner is not None:
            target = root / "models" / pack
            if inner == flat and not target.exists():
                cmd = f"mkdir -p {_q(root / 'models')} && mv {_q(flat)} {_q(target)}"
            else:  # moving the folder onto an existing one would nest it: move the files instead
                leftovers = " ".join(_q(d) for d in ([inner, flat] if inner != flat else [flat]))
                cmd = f"mkdir -p {_q(target)} && mv {_q(inner)}/* {_q(target)}/ && rmdir {leftovers}"
            diags.append(_Diagnosis(40, (
                f"The '{pack}' folder is at {flat}{os.sep} but insightface looks in {target}{os.sep} "
                f"(it adds a 'models' level under the insightface folder). Move it:\n  {cmd}"
            )))
    for zip_path in (root / "models" / f"{pack}.zip", root / f"{pack}.zip"):
        if zip_path.is_file():
            diags.append(_Diagnosis(30, (
                f"{zip_path} is still zipped. Unzip it so the .onnx files land in {root / 'models' / pack}{os.sep}:\n"
                f"  mkdir -p {_q(root / 'models' / pack)} && unzip -j {_q(zip_path)} '*.onnx' -d {_q(root / 'models' / pack)}"
            )))
    return None, diags


def _explain_incomplete(pack: str, pack_dir: Path, check: _DirCheck) -> str:
    info = KNOWN_PACKS.get(pack)
    lines = [f"The insightface pack folder {pack_dir}{os.sep} is incomplete or damaged."]
    for item in check.broken:
        lines.append(f"  - {item} (insightface opens every .onnx in the folder, so delete or replace it)")
    if not check.onnx:
        lines.append("  - it holds no .onnx files")
    elif not check.roles_ok:
        if check.detection is None:
            want = info.detection if info else " or ".join(DETECTION_PATTERNS)
            lines.append(f"  - the face detection model is missing (expected {want}; insightface then fails "
                         "with \"assert 'detection' in self.models\")")
        if check.recognition is None:
            want = info.recognition if info else " or ".join(RECOGNITION_PATTERNS)
            lines.append(f"  - the face recognition model is missing (expected {want})")
    lines.append(f"  Files there: {', '.join(check.onnx) or '(none)'}")
    lines.append("  " + _download_hint(pack))
    return "\n".join(lines)


def _download_hint(pack: str) -> str:
    info = KNOWN_PACKS.get(pack)
    if info is None:
        return (f"A pack holds a face detector (such as det_10g.onnx) and a recognizer (such as w600k_r50.onnx); "
                f"the standard packs are {' and '.join(DEFAULT_PACKS)}.")
    fetch = (f"'python -m facebooth weights fetch {info.manifest_id}' downloads and unpacks it (weights manifest "
             f"id '{info.manifest_id}'), or get " if info.manifest_id else "Get ")
    return (f"{fetch}{info.download} and unzip it so that {info.detection} and {info.recognition} sit directly "
            f"in the '{pack}' folder.")


def _packs_in(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and (_onnx_names(p) or _nested_dirs(p)))
    except OSError:
        return []


def _search(roots: list[Path], pack: str) -> tuple[Optional[PackLocation], list[_Diagnosis], list[str]]:
    diags: list[_Diagnosis] = []
    looked: list[str] = []
    for root in roots:
        if not root.is_dir():
            looked.append(f"{root} (does not exist)")
            continue
        looked.append(str(root))
        found, found_diags = _diagnose_root(root, pack)
        if found is not None:
            return found, [], looked
        diags += found_diags
    return None, diags, looked


def _pack_names(roots: list[Path]) -> list[str]:
    """Names of folders holding .onnx files (directly or one level down), under ``models/`` or not."""
    names: list[str] = []
    for root in roots:
        if root.is_dir():
            for name in _packs_in(root / "models") + _packs_in(root):
                if name != "models" and name not in names:
                    names.append(name)
    return names


def locate_pack(roots: Sequence[str | os.PathLike], pack: str) -> PackLocation:
    """The first usable copy of ``pack`` under ``roots`` or an InsightFacePackError that explains the fix."""
    pack = _check_pack_name(pack)
    paths = [Path(r).expanduser() for r in roots]
    if not paths:
        raise InsightFacePackError(
            "No 'insightface' model folder is registered. Create ComfyUI/models/insightface (or add an 'insightface:' "
            "entry to extra_model_paths.yaml) and restart ComfyUI."
        )
    found, diags, looked = _search(paths, pack)
    if found is not None:
        return found
    if diags:
        diags.sort(key=lambda d: -d.severity)
        raise InsightFacePackError(
            f"InsightFace pack '{pack}' cannot be used as it is.\n" + "\n\n".join(d.text for d in diags)
        )
    valid = [n for n in _pack_names(paths) if _search(paths, n)[0] is not None]
    target = next((r for r in paths if r.is_dir()), paths[0]) / "models" / pack
    raise InsightFacePackError(
        f"InsightFace pack '{pack}' was not found. insightface looks for it in <insightface folder>/models/{pack}/.\n"
        f"Looked in: {'; '.join(looked)}.\n"
        f"Packs found there: {', '.join(valid) if valid else '(none)'}.\n"
        f"{_download_hint(pack)} Put the files in {target}{os.sep}."
        + (" Or choose one of the packs found." if valid else "")
    )


def find_pack(roots: Sequence[str | os.PathLike], pack: str) -> str:
    """The ROOT to pass to insightface as ``FaceAnalysis(name=pack, root=ROOT)``.

    ``roots`` are the ``insightface`` model-folder paths (each a ``models/insightface`` directory).
    Raises InsightFacePackError whose message names the folders searched and the exact fix.
    """
    return locate_pack(roots, pack).root


def list_packs(roots: Sequence[str | os.PathLike]) -> list[str]:
    """Pack names for a node's combo: usable packs first, then misplaced or broken ones (choosing one shows
    what to fix), then the standard packs that are not installed yet."""
    paths = [Path(r).expanduser() for r in roots]
    names = _pack_names(paths)
    good = sorted(n for n in names if _search(paths, n)[0] is not None)
    bad = sorted(n for n in names if n not in good)
    missing = [n for n in DEFAULT_PACKS if n not in names]
    return good + bad + missing

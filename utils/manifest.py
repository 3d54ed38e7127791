"""The weights manifest: load and validate ``weights_manifest.json`` and resolve its entries to paths.

The schema is documented in ``docs/weights_manifest.md``. Validation collects every problem at once so a
broken manifest (ours, or a mirror's) is fixed in one pass; each message names the entry and the field.
Nothing here touches the network or ComfyUI: ``check`` / ``fetch`` (cli/weights.py) and the nodes build on it.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

SCHEMA_VERSION = 1

# Manifest groups, in display order.
KNOWN_METHODS: tuple[str, ...] = (
    "face",
    "cross_init",
    "face2diffusion",
    "portraitbooth",
    "instantbooth",
    "personamagic",
    "evaluation",
)

# The model folders this pack registers with ComfyUI (nodes/model_folders.py): key -> (default location under
# ComfyUI's models dir, posix and relative; accepted extensions). Kept here, host-independent, so the manifest
# and the CLI read the same table without ComfyUI.
WEIGHT_EXTS = frozenset({".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt"})
PACK_FOLDERS: dict[str, tuple[str, frozenset[str]]] = {
    "insightface": ("insightface", frozenset({".onnx"})),  # shared with other face packs
    "facebooth/face": ("facebooth/face", WEIGHT_EXTS),
    "facebooth/identities": ("facebooth/identities", frozenset({".safetensors"})),
    "facebooth/face2diffusion": ("facebooth/face2diffusion", WEIGHT_EXTS),
    "facebooth/portraitbooth": ("facebooth/portraitbooth", WEIGHT_EXTS),
    "facebooth/instantbooth": ("facebooth/instantbooth", WEIGHT_EXTS),
    "facebooth/personamagic": ("facebooth/personamagic", frozenset({".safetensors"})),
    "facebooth/evaluation": ("facebooth/evaluation", WEIGHT_EXTS),  # CLIP / FaceNet for scores
}

# ComfyUI model-folder key -> default location under ComfyUI's models dir (posix, relative): ours plus the core
# folders manifest entries may name.
FOLDER_DEFAULTS: dict[str, str] = {
    **{key: rel for key, (rel, _exts) in PACK_FOLDERS.items()},
    "clip_vision": "clip_vision",
    "embeddings": "embeddings",
    "checkpoints": "checkpoints",
}

ARCHIVE_FORMATS = ("zip",)

DEFAULT_MANIFEST_PATH = Path(__file__).resolve().parent.parent / "weights_manifest.json"

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,79}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TOP_KEYS = {"schema_version", "description", "methods"}
_GROUP_KEYS = {"description", "depends_on", "entries"}
_ENTRY_KEYS = {
    "id", "methods", "folder", "subfolder", "filename", "pattern", "size", "sha256", "url", "manual",
    "license", "required", "produced_by", "archive", "extract_to", "files", "one_of", "option",
    "description", "notes", "homepage",
}
_FILE_KEYS = {"name", "size", "sha256", "required"}


class ManifestError(ValueError):
    """The manifest is malformed. ``problems`` lists every problem found, one line each."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{source} is not a valid FaceBooth weights manifest ({len(self.problems)} problem(s)):\n{lines}\n"
            "See docs/weights_manifest.md for the schema."
        )


@dataclass(frozen=True)
class FileSpec:
    """One file on disk: its name (a plain file name), expected size and sha256 when known."""

    name: str
    size: int | None = None
    sha256: str | None = None
    required: bool = True


@dataclass(frozen=True)
class Entry:
    """One manifest entry: a downloadable file, a downloadable archive, or a file our own code produces."""

    id: str
    group: str
    methods: tuple[str, ...]
    folder: str
    license: str
    required: bool
    subfolder: str = ""
    filename: str | None = None
    pattern: str | None = None
    size: int | None = None
    sha256: str | None = None
    url: str | None = None
    manual: str | None = None
    produced_by: str | None = None
    archive: str | None = None
    extract_to: str | None = None
    files: tuple[FileSpec, ...] = ()
    one_of: str | None = None
    option: str | None = None
    description: str = ""
    notes: str = ""
    homepage: str | None = None

    @property
    def kind(self) -> str:
        if self.produced_by is not None:
            return "produced"
        return "archive" if self.archive else "file"

    @property
    def choice(self) -> str:
        """The option this entry belongs to inside its ``one_of`` group (its id unless set)."""
        return self.option or self.id

    @property
    def directory(self) -> str:
        """Folder-relative directory (posix) where this entry's file(s) live; '' for the folder itself."""
        return (self.extract_to if self.archive else self.subfolder) or ""

    def targets(self) -> list[tuple[str, FileSpec]]:
        """(folder-relative posix path, FileSpec) for every concrete file this entry puts on disk."""
        if self.archive:
            return [(_join(self.directory, f.name), f) for f in self.files]
        if self.filename:
            return [(_join(self.directory, self.filename), FileSpec(self.filename, self.size, self.sha256, True))]
        return []  # pattern entries have no fixed file names

    @property
    def display_name(self) -> str:
        if self.archive:
            return _join(self.directory, "*") + f" ({len(self.files)} files from {self.archive_name})"
        if self.pattern:
            return _join(self.directory, self.pattern)
        return _join(self.directory, self.filename or "")

    @property
    def archive_name(self) -> str:
        """File name the archive is downloaded as (last URL path segment, else '<id>.zip')."""
        if self.url:
            tail = self.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
            if tail.lower().endswith("." + (self.archive or "zip")):
                return tail
        return f"{self.id}.{self.archive or 'zip'}"

    @property
    def total_size(self) -> int | None:
        """Size of what is downloaded (the archive for archives), or None when unknown."""
        return self.size


@dataclass(frozen=True)
class MethodGroup:
    name: str
    description: str
    depends_on: tuple[str, ...]
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class Manifest:
    source: str
    schema_version: int
    description: str
    groups: tuple[MethodGroup, ...]

    @property
    def entries(self) -> list[Entry]:
        return [e for g in self.groups for e in g.entries]

    def group(self, name: str) -> MethodGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def get(self, entry_id: str) -> Entry:
        for e in self.entries:
            if e.id == entry_id:
                return e
        known = ", ".join(e.id for e in self.entries)
        raise KeyError(f"No weights entry with id {entry_id!r}. Known ids: {known}")

    def methods_with_dependencies(self, methods: Iterable[str] | None) -> list[str]:
        """The selected methods plus the groups they depend on, in manifest order (all when None)."""
        names = [g.name for g in self.groups]
        if methods is None:
            return names
        wanted: set[str] = set()
        stack = list(methods)
        while stack:
            m = stack.pop()
            if m not in names:
                raise KeyError(f"Unknown method {m!r}. Choose from: {', '.join(names)}")
            if m not in wanted:
                wanted.add(m)
                stack.extend(self.group(m).depends_on)
        return [n for n in names if n in wanted]

    def select(self, methods: Iterable[str] | None = None) -> list[tuple[str, list[Entry]]]:
        """(method, entries) for each selected method (and its dependencies); an entry appears under each
        selected method listed in its ``methods``."""
        out = []
        for m in self.methods_with_dependencies(methods):
            out.append((m, [e for e in self.entries if m in e.methods]))
        return out


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Load and validate a manifest file (ours by default). Raises ManifestError with every problem found."""
    path = Path(path) if path is not None else DEFAULT_MANIFEST_PATH
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(source, [f"cannot read the file: {exc}"]) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(source, [f"not valid JSON: {exc}"]) from exc
    return parse_manifest(data, source=source)


def parse_manifest(data: Any, *, source: str = "<manifest>") -> Manifest:
    """Validate already-decoded manifest data and build a Manifest."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ManifestError(source, ["the top level must be a JSON object"])
    for key in sorted(set(data) - _TOP_KEYS):
        problems.append(f"unknown top-level field {key!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    if data.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version must be {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.append("description must be a string")
        description = ""
    methods = data.get("methods")
    if not isinstance(methods, dict) or not methods:
        problems.append("methods must be a non-empty object: method name -> {description, depends_on, entries}")
        raise ManifestError(source, problems)

    groups: list[MethodGroup] = []
    seen_ids: dict[str, str] = {}
    for gname, gdata in methods.items():
        where = f"methods.{gname}"
        if gname not in KNOWN_METHODS:
            problems.append(f"{where}: unknown method {gname!r} (known: {', '.join(KNOWN_METHODS)})")
            continue
        if not isinstance(gdata, dict):
            problems.append(f"{where} must be an object with 'description' and 'entries'")
            continue
        for key in sorted(set(gdata) - _GROUP_KEYS):
            problems.append(f"{where}: unknown field {key!r} (allowed: {', '.join(sorted(_GROUP_KEYS))})")
        gdesc = gdata.get("description", "")
        if not isinstance(gdesc, str):
            problems.append(f"{where}.description must be a string")
            gdesc = ""
        deps = gdata.get("depends_on", [])
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            problems.append(f"{where}.depends_on must be a list of method names")
            deps = []
        for d in deps:
            if d not in methods or d == gname:
                problems.append(f"{where}.depends_on: {d!r} is not another method of this manifest")
        raw_entries = gdata.get("entries")
        if not isinstance(raw_entries, list):
            problems.append(f"{where}.entries must be a list")
            raw_entries = []
        entries = []
        for i, raw in enumerate(raw_entries):
            label = f"{where}.entries[{i}]"
            if isinstance(raw, dict) and isinstance(raw.get("id"), str):
                label += f" (id {raw['id']!r})"
            before = len(problems)
            entry = _parse_entry(raw, gname, label, problems)
            if entry is None or len(problems) != before:
                continue
            if entry.id in seen_ids:
                problems.append(f"{label}: duplicate id, already used in {seen_ids[entry.id]}")
                continue
            seen_ids[entry.id] = label
            entries.append(entry)
        groups.append(MethodGroup(gname, gdesc, tuple(deps), tuple(entries)))

    problems.extend(_check_one_of_groups([e for g in groups for e in g.entries]))
    if problems:
        raise ManifestError(source, problems)
    order = {m: i for i, m in enumerate(KNOWN_METHODS)}
    groups.sort(key=lambda g: order[g.name])
    return Manifest(source, SCHEMA_VERSION, description, tuple(groups))


def _parse_entry(raw: Any, group: str, label: str, problems: list[str]) -> Entry | None:
    if not isinstance(raw, dict):
        problems.append(f"{label} must be an object")
        return None
    p = problems.append
    for key in sorted(set(raw) - _ENTRY_KEYS):
        p(f"{label}: unknown field {key!r} (allowed: {', '.join(sorted(_ENTRY_KEYS))})")

    eid = raw.get("id")
    if not isinstance(eid, str) or not _ID_RE.match(eid):
        p(f"{label}: id must be lowercase letters, digits, '.', '_' or '-' (got {eid!r})")
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        p(f"{label}: methods must be a non-empty list of method names")
        methods = []
    else:
        for m in methods:
            if m not in KNOWN_METHODS:
                p(f"{label}: methods has unknown method {m!r} (known: {', '.join(KNOWN_METHODS)})")
        if group not in methods:
            p(f"{label}: methods must include the group it is listed under ({group!r})")
    folder = raw.get("folder")
    if folder not in FOLDER_DEFAULTS:
        p(f"{label}: folder must be one of {', '.join(FOLDER_DEFAULTS)} (got {folder!r})")
    lic = raw.get("license")
    if not isinstance(lic, str) or not lic.strip():
        p(f"{label}: license must be a non-empty string (write 'unknown' and explain in notes if it is)")
    required = raw.get("required")
    if not isinstance(required, bool):
        p(f"{label}: required must be true or false")

    subfolder = _rel_path(raw.get("subfolder", ""), f"{label}: subfolder", p)
    size = _size(raw.get("size"), f"{label}: size", p)
    sha = _sha(raw.get("sha256"), f"{label}: sha256", p)
    url = raw.get("url")
    if url is not None and (not isinstance(url, str) or not url.startswith(("https://", "http://"))):
        p(f"{label}: url must be an http(s) URL or null (got {url!r})")
    manual = _opt_str(raw.get("manual"), f"{label}: manual", p)
    produced_by = _opt_str(raw.get("produced_by"), f"{label}: produced_by", p)
    archive = raw.get("archive")
    filename = raw.get("filename")
    pattern = raw.get("pattern")
    files: list[FileSpec] = []
    extract_to = None

    if archive is not None:
        if archive not in ARCHIVE_FORMATS:
            p(f"{label}: archive must be one of {', '.join(ARCHIVE_FORMATS)} or absent (got {archive!r})")
        if "extract_to" not in raw:
            p(f"{label}: an archive entry needs extract_to (folder-relative directory for its files)")
        extract_to = _rel_path(raw.get("extract_to", ""), f"{label}: extract_to", p)
        if filename is not None or pattern is not None or raw.get("subfolder"):
            p(f"{label}: an archive entry lists its files in 'files'; filename, pattern and subfolder are not allowed")
        raw_files = raw.get("files")
        if not isinstance(raw_files, list) or not raw_files:
            p(f"{label}: an archive entry needs a non-empty 'files' list of {{name, size, sha256}}")
            raw_files = []
        names = set()
        for j, rf in enumerate(raw_files):
            flabel = f"{label}: files[{j}]"
            if not isinstance(rf, dict):
                p(f"{flabel} must be an object")
                continue
            for key in sorted(set(rf) - _FILE_KEYS):
                p(f"{flabel}: unknown field {key!r} (allowed: {', '.join(sorted(_FILE_KEYS))})")
            name = rf.get("name")
            _plain_name(name, f"{flabel}: name", p)
            if name in names:
                p(f"{flabel}: name {name!r} listed twice")
            names.add(name)
            freq = rf.get("required", True)
            if not isinstance(freq, bool):
                p(f"{flabel}: required must be true or false")
            files.append(FileSpec(str(name), _size(rf.get("size"), f"{flabel}: size", p),
                                  _sha(rf.get("sha256"), f"{flabel}: sha256", p), bool(freq)))
        if produced_by is not None:
            p(f"{label}: produced files cannot be archives")
    else:
        if "extract_to" in raw or "files" in raw:
            p(f"{label}: extract_to and files are only for archive entries (set archive: \"zip\")")
        if (filename is None) == (pattern is None):
            p(f"{label}: give exactly one of filename (a fixed file) or pattern (a glob, for produced files)")
        if filename is not None:
            _plain_name(filename, f"{label}: filename", p)
        if pattern is not None:
            if produced_by is None:
                p(f"{label}: pattern is only for produced files (set produced_by or use filename)")
            _plain_name(pattern, f"{label}: pattern", p)
            if size is not None or sha is not None:
                p(f"{label}: a pattern entry cannot have size or sha256")

    if produced_by is not None:
        if url is not None:
            p(f"{label}: a produced file has no url (it is made by {produced_by!r})")
    elif url is None and not manual:
        p(f"{label}: url is null, so 'manual' must say how to get the file (or set produced_by)")

    one_of = _opt_str(raw.get("one_of"), f"{label}: one_of", p)
    option = _opt_str(raw.get("option"), f"{label}: option", p)
    if option is not None and one_of is None:
        p(f"{label}: option is only meaningful together with one_of")
    description = raw.get("description", "")
    notes = raw.get("notes", "")
    for key, val in (("description", description), ("notes", notes)):
        if not isinstance(val, str):
            p(f"{label}: {key} must be a string")
    homepage = _opt_str(raw.get("homepage"), f"{label}: homepage", p)

    try:
        return Entry(
            id=str(eid), group=group, methods=tuple(methods), folder=str(folder), license=str(lic),
            required=bool(required), subfolder=subfolder or "", filename=filename, pattern=pattern, size=size,
            sha256=sha, url=url, manual=manual, produced_by=produced_by, archive=archive,
            extract_to=extract_to, files=tuple(files), one_of=one_of, option=option,
            description=description if isinstance(description, str) else "",
            notes=notes if isinstance(notes, str) else "", homepage=homepage,
        )
    except TypeError:  # only reachable with problems already recorded
        return None


def _check_one_of_groups(entries: Sequence[Entry]) -> list[str]:
    problems = []
    by_group: dict[str, list[Entry]] = {}
    for e in entries:
        if e.one_of:
            by_group.setdefault(e.one_of, []).append(e)
    for name, members in by_group.items():
        if len({m.choice for m in members}) < 2:
            problems.append(f"one_of group {name!r} has a single option ({members[0].choice!r}); it needs at least two")
        if not any(m.required for m in members):
            problems.append(f"one_of group {name!r} has no required entry, so it constrains nothing")
    return problems


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p)


def _rel_path(value: Any, what: str, p) -> str | None:
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        p(f"{what} must be a string")
        return None
    if "\\" in value or value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        p(f"{what} must be a relative path with '/' separators (got {value!r})")
        return None
    if any(part in ("..", ".") for part in value.split("/")):
        p(f"{what} must not contain '.' or '..' components (got {value!r})")
        return None
    return "/".join(PurePosixPath(value).parts)


def _plain_name(value: Any, what: str, p) -> None:
    if not isinstance(value, str) or not value or "/" in value or "\\" in value or value in (".", ".."):
        p(f"{what} must be a plain file name without folders (got {value!r})")


def _nullable(value: Any, valid: bool, problem: str, p) -> Any:
    """``value`` when it is None or ``valid``; otherwise report ``problem`` and return None."""
    if value is None or valid:
        return value
    p(problem)
    return None


def _size(value: Any, what: str, p) -> int | None:
    valid = not isinstance(value, bool) and isinstance(value, int) and value > 0
    return _nullable(value, valid, f"{what} must be a positive integer number of bytes or null (got {value!r})", p)


def _sha(value: Any, what: str, p) -> str | None:
    valid = isinstance(value, str) and bool(_SHA256_RE.match(value))
    return _nullable(value, valid, f"{what} must be 64 lowercase hex characters or null when unknown (got {value!r})", p)


def _opt_str(value: Any, what: str, p) -> str | None:
    return _nullable(value, isinstance(value, str) and bool(value.strip()), f"{what} must be a non-empty string or null", p)


# ----------------------------------------------------------------------------------------------------------------
# Resolving entries to paths


@dataclass
class ModelDirs:
    """Where model folders live: ComfyUI's models dir plus extra_model_paths.yaml-style additions.

    ``extra`` maps a folder key (e.g. ``insightface``) to extra directories, searched after the default one.
    """

    models_dir: Path | None
    extra: Mapping[str, Sequence[str | os.PathLike]] = field(default_factory=dict)

    def primary_dir(self, folder: str) -> Path:
        """The directory files of ``folder`` are written to (the default location under models_dir)."""
        if self.models_dir is not None:
            return Path(self.models_dir) / FOLDER_DEFAULTS[folder]
        extra = list(self.extra.get(folder, ()))
        if extra:
            return Path(extra[0])
        raise LookupError(f"No directory is known for model folder {folder!r}: give a models directory.")

    def search_dirs(self, folder: str) -> list[Path]:
        dirs: list[Path] = []
        if self.models_dir is not None:
            dirs.append(Path(self.models_dir) / FOLDER_DEFAULTS[folder])
        for d in self.extra.get(folder, ()):
            d = Path(d)
            if d not in dirs:
                dirs.append(d)
        return dirs


@dataclass(frozen=True)
class ResolvedFile:
    relpath: str  # folder-relative, posix
    spec: FileSpec
    path: Path | None  # where it was found, or None
    default_path: Path | None  # where fetch would put it


def resolve_entry(entry: Entry, dirs: ModelDirs) -> list[ResolvedFile]:
    """Locate every concrete file of ``entry``: the first search dir that has it wins."""
    search = dirs.search_dirs(entry.folder)
    try:
        primary: Path | None = dirs.primary_dir(entry.folder)
    except LookupError:
        primary = None
    out = []
    for rel, spec in entry.targets():
        found = next((d / rel for d in search if (d / rel).is_file()), None)
        out.append(ResolvedFile(rel, spec, found, primary / rel if primary is not None else None))
    return out


def find_pattern_files(entry: Entry, dirs: ModelDirs) -> list[Path]:
    """Files matching a pattern entry, searched recursively below its directory in every search dir."""
    if not entry.pattern:
        return []
    found: list[Path] = []
    for d in dirs.search_dirs(entry.folder):
        base = d / entry.directory if entry.directory else d
        if not base.is_dir():
            continue
        for root, _dirs, names in os.walk(base):
            for n in sorted(names):
                if fnmatch.fnmatch(n, entry.pattern) and not n.startswith("."):
                    found.append(Path(root) / n)
    return found


def load_extra_model_paths(yaml_path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a ComfyUI ``extra_model_paths.yaml`` into {folder key: [absolute dirs]}.

    Follows ComfyUI's rules: each top-level section may set ``base_path`` (relative paths are taken from the
    yaml file's folder, ``~`` and ``$VARS`` expanded) and ``is_default``; every other key is a folder key whose
    value holds one or more paths, one per line.
    """
    try:
        import yaml  # ComfyUI depends on PyYAML; outside ComfyUI it may be missing
    except ImportError as exc:
        raise RuntimeError(
            f"Reading {yaml_path} needs PyYAML (pip install pyyaml), which ComfyUI itself installs."
        ) from exc
    yaml_path = Path(yaml_path)
    with open(yaml_path, encoding="utf-8") as fh:
        config = yaml.safe_load(fh) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{yaml_path}: expected sections of 'folder key: path' mappings at the top level.")
    yaml_dir = yaml_path.resolve().parent
    out: dict[str, list[str]] = {}
    for section, conf in config.items():
        if conf is None:
            continue
        if not isinstance(conf, dict):
            raise ValueError(f"{yaml_path}: section {section!r} must be a mapping of folder keys to paths.")
        conf = dict(conf)
        base = conf.pop("base_path", None)
        conf.pop("is_default", None)
        if base is not None:
            base = os.path.expandvars(os.path.expanduser(str(base)))
            if not os.path.isabs(base):
                base = os.path.join(yaml_dir, base)
        for key, value in conf.items():
            for line in str(value).split("\n"):
                line = line.strip()
                if not line:
                    continue
                full = os.path.join(base, line) if base else (line if os.path.isabs(line) else os.path.join(yaml_dir, line))
                out.setdefault(str(key), []).append(os.path.normpath(full))
    return out


def merge_extra(*mappings: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in mappings:
        for k, v in m.items():
            for d in v:
                if str(d) not in out.setdefault(k, []):
                    out[k].append(str(d))
    return out

"""``python -m facebooth weights {list,check,fetch}``: what weights FaceBooth uses, whether they are in place, and
downloading the ones that have a direct URL.

Models-dir resolution (all three actions): ``--models-dir``, else ``--comfyui-dir``/models, else
``$COMFYUI_DIR/models``, else ``$FACEBOOTH_MODELS_DIR``, else the models folder of the ComfyUI this pack is in
(``ComfyUI/custom_nodes/<pack>``). A ComfyUI dir's ``extra_model_paths.yaml`` (and any
``--extra-model-paths`` file) adds search directories per folder key, as ComfyUI itself does.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence, TextIO

from ..utils.download import DownloadError, download_file, extract_zip, file_problem
from ..utils.manifest import (
    KNOWN_METHODS,
    Entry,
    FileSpec,
    Manifest,
    ManifestError,
    ModelDirs,
    find_pattern_files,
    load_extra_model_paths,
    load_manifest,
    merge_extra,
    resolve_entry,
)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2

# File states. The last three are problems.
OK, PRESENT, FOUND, NOT_NEEDED = "ok", "present", "found", "not needed"
MISSING, CORRUPT, MISPLACED = "MISSING", "CORRUPT", "MISPLACED"
PROBLEM_STATES = (MISSING, CORRUPT, MISPLACED)


class UsageError(Exception):
    """Bad command-line input or environment; printed as one clear message (exit code 2)."""


# ----------------------------------------------------------------------------------------------------------------
# argparse wiring


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "weights",
        help="list, check and download the model weights FaceBooth uses",
        description="List, check and download the model weights listed in weights_manifest.json.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--manifest", type=Path, default=None,
                        help="manifest file to use instead of the pack's weights_manifest.json")
    common.add_argument("--models-dir", type=Path, default=None,
                        help="ComfyUI's models folder (default: $COMFYUI_DIR/models, else $FACEBOOTH_MODELS_DIR)")
    common.add_argument("--comfyui-dir", type=Path, default=None,
                        help="ComfyUI folder: uses its models/ and its extra_model_paths.yaml")
    common.add_argument("--extra-model-paths", type=Path, action="append", default=[], metavar="YAML",
                        help="an extra_model_paths.yaml whose folders are searched too (repeatable)")
    method_help = f"only this method and what it depends on (repeatable; one of {', '.join(KNOWN_METHODS)})"

    actions = parser.add_subparsers(dest="weights_action", metavar="ACTION")
    actions.required = True

    p_list = actions.add_parser("list", parents=[common], help="table of every weight file and its status")
    p_list.add_argument("--method", action="append", choices=KNOWN_METHODS, help=method_help)
    p_list.set_defaults(func=cmd_list)

    p_check = actions.add_parser("check", parents=[common],
                                 help="report missing, corrupt or misplaced files (exit 1 if a required one is)")
    p_check.add_argument("--method", action="append", choices=KNOWN_METHODS, help=method_help)
    p_check.add_argument("--quick", action="store_true", help="skip sha256 hashing (sizes and headers only)")
    p_check.set_defaults(func=cmd_check)

    p_fetch = actions.add_parser("fetch", parents=[common],
                                 help="download entries by id, or the required entries of a method")
    p_fetch.add_argument("ids", nargs="*", metavar="ID", help="manifest entry ids (see 'weights list')")
    p_fetch.add_argument("--method", action="append", choices=KNOWN_METHODS, help=method_help)
    p_fetch.add_argument("--include-optional", action="store_true", help="with --method: optional entries too")
    p_fetch.add_argument("--force", action="store_true", help="download again even if the file is already valid")
    p_fetch.add_argument("--retries", type=int, default=3, help="resume attempts after a dropped connection")
    p_fetch.add_argument("--timeout", type=float, default=60.0, help="seconds without data before giving up")
    p_fetch.set_defaults(func=cmd_fetch)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers


def resolve_model_dirs(args: argparse.Namespace, env: Mapping[str, str] | None = None, *,
                       required: bool = True) -> ModelDirs | None:
    """Models dir from the arguments / environment plus extra paths; None (or UsageError) when unknown."""
    env = os.environ if env is None else env
    yaml_files: list[Path] = list(getattr(args, "extra_model_paths", []) or [])
    comfy = getattr(args, "comfyui_dir", None) or (Path(env["COMFYUI_DIR"]) if env.get("COMFYUI_DIR") else None)
    if comfy is None and args.models_dir is None and not env.get("FACEBOOTH_MODELS_DIR"):
        from ..runner.server import find_enclosing_comfyui

        comfy = find_enclosing_comfyui()  # a pack cloned into ComfyUI/custom_nodes uses that ComfyUI
    if args.models_dir is not None:
        models: Path | None = Path(args.models_dir)
    elif comfy is not None:
        models = Path(comfy) / "models"
    elif env.get("FACEBOOTH_MODELS_DIR"):
        models = Path(env["FACEBOOTH_MODELS_DIR"])
    else:
        models = None
    if comfy is not None and args.models_dir is None and (Path(comfy) / "extra_model_paths.yaml").is_file():
        yaml_files.insert(0, Path(comfy) / "extra_model_paths.yaml")
    if models is None and not yaml_files:
        if required:
            raise UsageError(
                "No models directory. Pass --models-dir DIR (ComfyUI's 'models' folder) or --comfyui-dir DIR, "
                "or set COMFYUI_DIR (the ComfyUI folder) or FACEBOOTH_MODELS_DIR (a models folder)."
            )
        return None
    extra = []
    for y in yaml_files:
        if not Path(y).is_file():
            raise UsageError(f"extra model paths file {y} does not exist.")
        try:
            extra.append(load_extra_model_paths(y))
        except (OSError, ValueError, RuntimeError) as exc:
            raise UsageError(f"cannot read {y}: {exc}") from exc
        log.debug("Extra model paths from %s", y)
    return ModelDirs(models, merge_extra(*extra))


def _load(args: argparse.Namespace) -> Manifest:
    try:
        return load_manifest(args.manifest)
    except ManifestError as exc:
        raise UsageError(str(exc)) from exc


def _selected(args: argparse.Namespace) -> tuple[Manifest, list]:
    """The manifest and the entries of ``--method`` (an unknown method is a usage error)."""
    manifest = _load(args)
    try:
        return manifest, manifest.select(args.method)
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from exc


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


def _source(entry: Entry) -> str:
    return "produced" if entry.produced_by else "manual" if entry.url is None else "download"


def _run(action, args: argparse.Namespace) -> int:
    try:
        return action(args, sys.stdout)
    except UsageError as exc:
        log.error("%s", exc)
        return EXIT_USAGE


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Status of entries on disk


@dataclass
class FileStatus:
    entry: Entry
    label: str  # folder-relative path or pattern
    spec: FileSpec | None
    state: str
    path: Path | None = None
    detail: str = ""
    fix: str | None = None

    @property
    def counts(self) -> bool:
        """A problem that makes ``check`` fail: required entry, required file, problem state."""
        return (self.state in PROBLEM_STATES and self.entry.required
                and (self.spec is None or self.spec.required))


def _misplaced(entry: Entry, rel: str, dirs: ModelDirs) -> tuple[Path, Path] | None:
    """Where a missing archive file sits by mistake: (wrong dir, right dir), or None.

    Catches the classic insightface mistakes: the zip's own folder unpacked inside the pack folder
    (``models/antelopev2/antelopev2/*.onnx``) and the pack folder without the ``models/`` level
    (``insightface/antelopev2/*.onnx``).
    """
    if not entry.archive:
        return None
    name = rel.rsplit("/", 1)[-1]
    right_rel = entry.directory
    for base in dirs.search_dirs(entry.folder):
        right = base / right_rel if right_rel else base
        if right.is_dir():
            for sub in sorted(p for p in right.iterdir() if p.is_dir()):
                if (sub / name).is_file():
                    return sub, right
        if right_rel and "/" in right_rel:
            flat = base / right_rel.rsplit("/", 1)[-1]
            if (flat / name).is_file():
                return flat, right
    return None


def _fix_command(wrong: Path, right: Path, names: Sequence[str]) -> str:
    q = shlex.quote
    suffixes = {Path(n).suffix for n in names}
    if len(suffixes) == 1 and next(iter(suffixes)):
        src = f"{q(str(wrong))}/*{next(iter(suffixes))}"
    else:
        src = " ".join(q(str(wrong / n)) for n in names)
    if wrong.parent == right or right.exists():  # nested inside the right folder, or both exist
        return f"mv {src} {q(str(right))}/ && rmdir {q(str(wrong))}"
    return f"mkdir -p {q(str(right.parent))} && mv {q(str(wrong))} {q(str(right))}"


def entry_status(entry: Entry, dirs: ModelDirs, *, check_hash: bool) -> list[FileStatus]:
    if entry.pattern:
        found = find_pattern_files(entry, dirs)
        if not found:
            return [FileStatus(entry, entry.display_name, None, MISSING, detail="none yet")]
        out = []
        for p in found:
            problem = file_problem(p, check_hash=False)
            out.append(FileStatus(entry, str(p.name), None, CORRUPT if problem else FOUND, p, problem or ""))
        return out
    statuses = []
    for rf in resolve_entry(entry, dirs):
        if rf.path is not None:
            problem = file_problem(rf.path, rf.spec.size, rf.spec.sha256, check_hash=check_hash)
            if problem:
                statuses.append(FileStatus(entry, rf.relpath, rf.spec, CORRUPT, rf.path, problem))
            else:
                verified = rf.spec.size is not None or rf.spec.sha256 is not None
                statuses.append(FileStatus(entry, rf.relpath, rf.spec, OK if verified else PRESENT, rf.path))
            continue
        spot = _misplaced(entry, rf.relpath, dirs)
        if spot:
            wrong, right = spot
            statuses.append(FileStatus(entry, rf.relpath, rf.spec, MISPLACED, wrong / rf.spec.name,
                                       f"found in {wrong} instead of {right}"))
        else:
            statuses.append(FileStatus(entry, rf.relpath, rf.spec, MISSING, detail=f"expected at {rf.default_path}"))
    # One fix command for all misplaced files of the entry that sit in the same wrong folder.
    by_wrong: dict[Path, list[FileStatus]] = {}
    for s in statuses:
        if s.state == MISPLACED and s.path is not None:
            by_wrong.setdefault(s.path.parent, []).append(s)
    for wrong, group in by_wrong.items():
        spot = _misplaced(entry, group[0].label, dirs)
        right = spot[1] if spot else wrong
        names = [s.spec.name for s in group if s.spec is not None]
        # Move every listed file present in the wrong folder, not only the misplaced ones.
        names = [n for n in (f.name for f in entry.files) if (wrong / n).is_file()] or names
        cmd = _fix_command(wrong, right, names)
        for s in group:
            s.fix = cmd
    return statuses


def _option_complete(statuses: Iterable[FileStatus]) -> bool:
    return not any(s.counts for s in statuses)


def apply_one_of(statuses: dict[str, list[FileStatus]], entries: Sequence[Entry]) -> dict[str, str]:
    """Resolve ``one_of`` groups: when one option is complete, the others' problems stop counting.

    Returns {group name: summary line}.
    """
    summaries = {}
    groups: dict[str, dict[str, list[Entry]]] = {}
    for e in entries:
        if e.one_of:
            groups.setdefault(e.one_of, {}).setdefault(e.choice, []).append(e)
    for gname, options in groups.items():
        complete = [opt for opt, es in options.items()
                    if _option_complete(s for e in es for s in statuses[e.id])]
        if complete:
            chosen = complete[0]
            for opt, es in options.items():
                if opt in complete:
                    continue
                for e in es:
                    for s in statuses[e.id]:
                        if s.state in PROBLEM_STATES:
                            s.detail = f"not needed: {chosen} is complete" + (f"; {s.detail}" if s.detail else "")
                            s.state = NOT_NEEDED
            others = [o for o in options if o != chosen]
            summaries[gname] = f"{gname}: '{chosen}' is complete" + (
                f" (alternatives not needed: {', '.join(others)})" if others else "")
        else:
            parts = []
            for opt, es in options.items():
                n = sum(1 for e in es for s in statuses[e.id] if s.counts)
                parts.append(f"'{opt}' lacks {n} file(s)")
                # Only one option is needed: report the group once below, not every alternative.
            summaries[gname] = f"{gname}: none of the alternatives is complete ({'; '.join(parts)}); one is needed"
    return summaries


def _how_to_get(entry: Entry, dirs: ModelDirs | None) -> str:
    if entry.produced_by:
        return f"produced by {entry.produced_by}"
    if entry.url is None:
        return "manual: " + _manual_text(entry, dirs)
    return f"python -m facebooth weights fetch {entry.id}"


def _manual_text(entry: Entry, dirs: ModelDirs | None) -> str:
    text = entry.manual or ""
    target = None
    if dirs is not None:
        try:
            base = dirs.primary_dir(entry.folder)
            target = base / entry.directory / (entry.filename or "") if entry.filename else base / entry.directory
        except LookupError:
            target = None
    where = str(target) if target is not None else (
        f"<models>/{entry.folder}/" + "/".join(p for p in (entry.directory, entry.filename or "") if p))
    return text.replace("{path}", where)


# ----------------------------------------------------------------------------------------------------------------
# list


def cmd_list(args: argparse.Namespace) -> int:
    return _run(_list, args)


def _list(args: argparse.Namespace, out: TextIO) -> int:
    _, selection = _selected(args)
    dirs = resolve_model_dirs(args, required=False)
    if dirs is None:
        log.info("No models directory given: the status column is empty (use --models-dir or set COMFYUI_DIR).")
    cache: dict[str, list[FileStatus]] = {}
    rows = [("METHOD", "ID", "FILE", "FOLDER", "SIZE", "REQUIRED", "SOURCE", "STATUS")]
    for method, entries in selection:
        for e in entries:
            if dirs is not None and e.id not in cache:
                cache[e.id] = entry_status(e, dirs, check_hash=False)
            req = "yes" if e.required and not e.one_of else f"one of {e.one_of}" if e.one_of else "no"
            if e.pattern:
                st = "-"
                if dirs is not None:
                    found = [s for s in cache[e.id] if s.state != MISSING]
                    st = f"{len(found)} file(s)" if found else "none yet"
                rows.append((method, e.id, e.display_name, e.folder, "-", req, _source(e), st))
                continue
            statuses = {s.label: s for s in cache.get(e.id, [])}
            for rel, spec in e.targets():
                s = statuses.get(rel)
                st = "-" if s is None else s.state if s.state != CORRUPT else "CORRUPT"
                rows.append((method, e.id, rel, e.folder, human_size(spec.size),
                             req if spec.required else "no", _source(e), st))
    _table(rows, out)
    if dirs is not None and dirs.models_dir is not None:
        out.write(f"\nmodels dir: {dirs.models_dir}  (sizes checked only; 'weights check' also verifies sha256)\n")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# check


def cmd_check(args: argparse.Namespace) -> int:
    return _run(_check, args)


def _check(args: argparse.Namespace, out: TextIO) -> int:
    manifest, selection = _selected(args)
    dirs = resolve_model_dirs(args, required=True)
    assert dirs is not None
    if dirs.models_dir is not None and not dirs.models_dir.is_dir():
        raise UsageError(f"The models directory {dirs.models_dir} does not exist. Point --models-dir at ComfyUI's "
                         "'models' folder (or --comfyui-dir at the ComfyUI folder).")
    out.write(f"models dir: {dirs.models_dir}\n")
    for key, paths in sorted(dirs.extra.items()):
        out.write(f"extra paths for {key}: {', '.join(paths)}\n")

    selected = {e.id: e for _, es in selection for e in es}
    statuses = {eid: entry_status(e, dirs, check_hash=not args.quick) for eid, e in selected.items()}
    summaries = apply_one_of(statuses, list(selected.values()))

    for method, entries in selection:
        group = manifest.group(method)
        out.write(f"\n== {method}: {group.description} ==\n")
        if not entries:
            out.write("  (no weight files)\n")
        shown_groups = set()
        for e in entries:
            last_fix = None
            for s in statuses[e.id]:
                optional = not e.required or (s.spec is not None and not s.spec.required)
                tag = " (optional)" if optional else ""
                # Upper case only for what makes the check fail.
                state = s.state if s.counts or s.state not in PROBLEM_STATES else s.state.lower()
                where = s.detail or (str(s.path) if s.path else "")
                out.write(f"  {state:<10}  {e.folder}/{s.label}{tag}  {where}".rstrip() + "\n")
                if s.fix and s.fix != last_fix:
                    out.write(f"      fix: {s.fix}\n")
                    last_fix = s.fix
            if any(s.state in (MISSING, CORRUPT) for s in statuses[e.id]) and (e.required or e.one_of):
                out.write(f"      get it: {_how_to_get(e, dirs)}\n")
            if e.one_of and e.one_of not in shown_groups:
                shown_groups.add(e.one_of)
        for g in sorted(shown_groups):
            out.write(f"  one of {summaries[g]}\n")

    problems = [s for es in statuses.values() for s in es if s.counts and not s.entry.one_of]
    open_groups = sorted({s.entry.one_of for es in statuses.values() for s in es if s.counts and s.entry.one_of})
    if problems or open_groups:
        parts = []
        if problems:
            parts.append(f"{len(problems)} required file(s) missing, corrupt or misplaced")
        if open_groups:
            parts.append(f"no complete option for {', '.join(open_groups)}")
        out.write(f"\nFAILED: {'; '.join(parts)} (see 'fix' / 'get it' above).\n")
        return EXIT_PROBLEMS
    out.write("\nOK: every required file of the selected methods is in place.\n")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# fetch


class ProgressPrinter:
    """Download progress on stderr: one updating line on a terminal, a line per 10% otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.last_step = -1
        self.last_draw = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        rate = done / max(now - self.start, 1e-6)
        if total:
            pct = 100.0 * done / total
            text = f"{self.label}: {pct:5.1f}% {human_size(done)} / {human_size(total)} ({human_size(int(rate))}/s)"
            step = int(pct // 10)
        else:
            text = f"{self.label}: {human_size(done)} ({human_size(int(rate))}/s)"
            step = done // (50 * 10**6)
        if self.tty:
            if now - self.last_draw > 0.2 or (total and done >= total):
                self.stream.write("\r" + text + " " * 4)
                self.stream.flush()
                self.last_draw = now
        elif step != self.last_step:
            self.stream.write(text + "\n")
            self.last_step = step

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def entry_is_complete(entry: Entry, dirs: ModelDirs) -> bool:
    statuses = entry_status(entry, dirs, check_hash=True)
    return not any(s.state in PROBLEM_STATES and (s.spec is None or s.spec.required) for s in statuses)


def fetch_entry(entry: Entry, dirs: ModelDirs, *, retries: int = 3, timeout: float = 60.0,
                progress_stream: TextIO | None = None) -> list[Path]:
    """Download (and for archives unpack) one entry into the primary directory of its folder."""
    if entry.url is None:
        raise DownloadError(f"{entry.id} has no direct download URL.")
    base = dirs.primary_dir(entry.folder)
    if entry.archive:
        dest = base / entry.archive_name
    else:
        dest = base / entry.directory / str(entry.filename)
    printer = ProgressPrinter(dest.name, progress_stream)
    try:
        if dest.is_file() and entry.archive and file_problem(dest, entry.size, entry.sha256) is None:
            log.info("Using the already downloaded %s", dest)
        else:
            download_file(entry.url, dest, size=entry.size, sha256=entry.sha256, progress=printer,
                          retries=retries, timeout=timeout)
    finally:
        printer.close()
    if not entry.archive:
        return [dest]
    try:
        return extract_zip(dest, base / entry.directory if entry.directory else base, entry.files)
    finally:
        dest.unlink(missing_ok=True)  # the archive is only a vehicle; a bad one must not linger either


def plan_fetch(manifest: Manifest, methods: Sequence[str], dirs: ModelDirs, include_optional: bool) -> list[Entry]:
    """Entries to fetch for ``methods``: the required ones (and optional ones if asked), produced files
    excluded, and for each ``one_of`` group nothing when an option is already complete, else its first option
    that can be downloaded entirely."""
    seen: dict[str, Entry] = {}
    for _, es in manifest.select(methods):
        for e in es:
            seen.setdefault(e.id, e)
    candidates = [e for e in seen.values() if not e.produced_by]
    plan: list[Entry] = []
    handled_groups: set[str] = set()
    for e in candidates:
        if e.one_of:
            if e.one_of in handled_groups:
                continue
            handled_groups.add(e.one_of)
            options: dict[str, list[Entry]] = {}
            for m in candidates:
                if m.one_of == e.one_of:
                    options.setdefault(m.choice, []).append(m)
            if any(all(entry_is_complete(m, dirs) for m in ms if m.required) for ms in options.values()):
                continue
            downloadable = [ms for ms in options.values() if all(m.url for m in ms if m.required)]
            chosen = downloadable[0] if downloadable else next(iter(options.values()))
            plan.extend(m for m in chosen if m.required or include_optional)
        elif e.required or include_optional:
            plan.append(e)
    return plan


def cmd_fetch(args: argparse.Namespace) -> int:
    return _run(_fetch, args)


def _fetch(args: argparse.Namespace, out: TextIO) -> int:
    manifest = _load(args)
    if not args.ids and not args.method:
        raise UsageError("Name what to fetch: entry ids (see 'python -m facebooth weights list') or --method M.")
    if args.ids and args.method:
        raise UsageError("Give entry ids or --method, not both.")
    dirs = resolve_model_dirs(args, required=True)
    assert dirs is not None
    explicit = bool(args.ids)
    if explicit:
        try:
            entries = [manifest.get(i) for i in dict.fromkeys(args.ids)]
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from exc
    else:
        entries = plan_fetch(manifest, args.method, dirs, args.include_optional)
        if not entries:
            out.write("Nothing to fetch: the required downloadable files are already in place.\n")

    failures = 0
    for e in entries:
        if e.produced_by:
            out.write(f"{e.id}: not downloadable; it is produced by {e.produced_by}.\n")
            failures += explicit
            continue
        if e.url is None:
            out.write(f"{e.id}: no direct download URL; get it by hand:\n    {_manual_text(e, dirs)}\n")
            if e.homepage:
                out.write(f"    (see {e.homepage})\n")
            failures += 1
            continue
        if not args.force and entry_is_complete(e, dirs):
            out.write(f"{e.id}: already in place and valid.\n")
            continue
        log.info("Fetching %s from %s", e.id, e.url)
        try:
            written = fetch_entry(e, dirs, retries=max(0, args.retries), timeout=args.timeout)
        except (DownloadError, OSError) as exc:
            log.error("%s: %s", e.id, exc)
            failures += 1
            continue
        for p in written:
            out.write(f"{e.id}: installed {p}\n")
    if failures:
        out.write(f"\n{failures} entr{'y' if failures == 1 else 'ies'} not fetched (see above).\n")
        return EXIT_PROBLEMS
    return EXIT_OK

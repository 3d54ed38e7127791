"""Standard-library downloads and file integrity: resumable HTTP fetch, safe zip extraction, file checks.

Only ``urllib`` is used so the pack needs no new dependency. A download goes to ``<dest>.part`` (resumed with
an HTTP Range request when the server allows it), is checked against the expected size and sha256 when they are
known, and only then renamed onto ``<dest>``: an interrupted or corrupt download never leaves a final file.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import socket
import stat
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Protocol, Sequence

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "FaceBooth-weights-fetch/1 (python-urllib)"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format itself caps the header at 100 MB

ProgressFn = Callable[[int, "int | None"], None]


class DownloadError(RuntimeError):
    """A download or an extraction failed; the message says what to do."""


class IntegrityError(DownloadError):
    """Downloaded bytes do not match the expected size or sha256."""


class UnsafeArchiveError(DownloadError):
    """An archive holds a member that could write outside its folder (absolute path, '..', link)."""


class _Interrupted(Exception):
    """The transfer stopped early; what arrived stays in the .part file and can be resumed."""


class _FileSpecLike(Protocol):
    name: str
    size: int | None
    sha256: str | None
    required: bool


# ----------------------------------------------------------------------------------------------------------------
# File integrity


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8,
}


def safetensors_header_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a readable safetensors file (header and offsets only), or None when it is.

    Reads just the header, so it is cheap on multi-GB files; catches truncation, HTML error pages saved under
    a .safetensors name, and offsets that do not cover the data exactly.
    """
    path = Path(path)
    total = path.stat().st_size
    if total < 8:
        return f"only {total} bytes: too short to be a safetensors file"
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n < 2 or n > _MAX_SAFETENSORS_HEADER or 8 + n > total:
            return f"header length {n} does not fit a {total}-byte file: truncated or not a safetensors file"
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "the safetensors header is not valid JSON: the file is corrupt or not a safetensors file"
    if not isinstance(header, dict):
        return "the safetensors header is not a JSON object"
    data_len = total - 8 - n
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape = info["shape"]
            dtype = info["dtype"]
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError
                numel *= d
        except (KeyError, TypeError, ValueError):
            return f"tensor {key!r} has a malformed entry in the safetensors header"
        if end > data_len:
            return f"tensor {key!r} needs bytes up to {end} but the file has {data_len} data bytes: it is truncated"
        width = _DTYPE_BYTES.get(str(dtype))
        if width is not None and numel * width != end - begin:
            return f"tensor {key!r} ({dtype}, shape {shape}) does not match its byte range {begin}..{end}"
        end_max = max(end_max, end)
    if end_max != data_len:
        return f"the header covers {end_max} data bytes but the file holds {data_len}: corrupt file"
    return None


def file_problem(
    path: str | os.PathLike, size: int | None = None, sha256: str | None = None, *, check_hash: bool = True
) -> str | None:
    """What is wrong with an existing file (size, safetensors header, sha256), or None when all known checks pass."""
    path = Path(path)
    try:
        actual = path.stat().st_size
    except OSError as exc:
        return f"cannot read it: {exc}"
    if size is not None and actual != size:
        return f"size is {actual:,} bytes, expected {size:,} (incomplete or a different file)"
    if path.suffix.lower() in (".safetensors", ".sft"):
        problem = safetensors_header_problem(path)
        if problem:
            return problem
    if check_hash and sha256:
        try:
            digest = sha256_file(path)
        except OSError as exc:
            return f"cannot read it: {exc}"
        if digest != sha256:
            return f"sha256 is {digest}, expected {sha256} (corrupt or a different file)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# HTTP download with resume


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    sha256: str | None = None,
    progress: ProgressFn | None = None,
    retries: int = 2,
    timeout: float = 30.0,
    retry_wait: float = 1.0,
) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part`` (resumed if present), verify, then rename atomically.

    ``retries`` extra attempts resume after a dropped connection. On an interruption that outlasts them the
    ``.part`` file is kept, so running the same command again resumes. On a size or sha256 mismatch the
    ``.part`` file is deleted and nothing is installed.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        try:
            _fetch_into(url, part, size, progress, timeout)
            break
        except _Interrupted as exc:
            have = part.stat().st_size if part.exists() else 0
            if attempt >= retries:
                raise DownloadError(
                    f"Download of {dest.name} from {url} was interrupted after {have:,} bytes ({exc}). "
                    f"The partial file {part} was kept: run the same command again to resume."
                ) from None
            attempt += 1
            log.warning("Download of %s interrupted (%s); resuming at byte %d (retry %d/%d)",
                        dest.name, exc, have, attempt, retries)
            time.sleep(retry_wait * attempt)

    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise IntegrityError(
            f"{dest.name}: downloaded {got:,} bytes, expected {size:,}. The download was deleted and nothing was "
            f"installed. Run the command again; if it keeps failing the file at {url} has changed."
        )
    if sha256:
        digest = sha256_file(part)
        if digest != sha256:
            part.unlink()
            raise IntegrityError(
                f"{dest.name}: sha256 mismatch (expected {sha256}, got {digest}). The download was deleted and "
                f"nothing was installed. Run the command again; if it keeps failing the file at {url} has changed."
            )
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, size: int | None, progress: ProgressFn | None, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        log.info("Discarding %s: it is larger than the expected %d bytes", part.name, size)
        part.unlink()
        have = 0
    if size is not None and have == size:
        return  # complete from an earlier run; verified by the caller
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            total = _content_range_total(exc.headers.get("Content-Range"))
            if total == have:
                return  # the .part already holds everything
            log.info("Server refused to resume %s; starting over", part.name)
            part.unlink()
            raise _Interrupted("server refused the resume request") from None
        if exc.code >= 500 or exc.code == 429:
            raise _Interrupted(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}. Check the URL in the manifest.") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Interrupted(f"connection failed: {reason}") from None

    with response:
        if have and response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _Interrupted(f"server resumed at byte {start}, not {have}; starting over")
            mode = "ab"
        else:
            if have:
                log.info("Server does not support resuming %s; downloading it again from the start", part.name)
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if size is not None and total is not None and total != size:
            raise DownloadError(
                f"The server offers {total:,} bytes for {url} but the manifest expects {size:,}: "
                "the file there has changed or the URL points to a web page. Nothing was written."
            )
        expected = total if total is not None else size
        done = have
        if progress:
            progress(done, expected)
        with open(part, mode) as fh:
            while True:
                try:
                    block = response.read(CHUNK)
                except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as exc:
                    raise _Interrupted(f"{type(exc).__name__}") from None
                if not block:
                    break
                fh.write(block)
                done += len(block)
                if progress:
                    progress(done, expected)
    if expected is not None and done < expected:
        # http.client reports a short body as a clean EOF, so the length is checked here.
        raise _Interrupted(f"connection closed at byte {done:,} of {expected:,}")


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        raise _Interrupted(f"bad Content-Range header {value!r}")
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total


def _content_range_total(value: str | None) -> int | None:
    m = re.match(r"bytes\s+\*/(\d+)", value or "")
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------------------------
# Zip extraction


def unsafe_member_reason(info: zipfile.ZipInfo) -> str | None:
    """Why extracting this member could escape the target folder, or None when it is safe."""
    name = info.filename.replace("\\", "/")
    if "\x00" in name:
        return "NUL byte in the name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in name.split("/"):
        return "'..' path component"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    return None


def extract_zip(zip_path: str | os.PathLike, dest_dir: str | os.PathLike, files: Sequence[_FileSpecLike]) -> list[Path]:
    """Extract the listed files from a zip straight into ``dest_dir``, whatever folders they sit in inside it.

    Every member is checked first and the whole archive is refused if any is unsafe. Files are matched by
    name, so a zip that wraps them in a top-level folder (insightface's antelopev2.zip) still ends up flat in
    ``dest_dir`` instead of the classic nested ``antelopev2/antelopev2/``. Each file is verified (size, sha256
    when known) before any is moved into place.
    """
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"{zip_path.name} is not a valid zip file ({exc}). Delete it and fetch again.") from exc
    with zf:
        infos = zf.infolist()
        for info in infos:
            reason = unsafe_member_reason(info)
            if reason:
                raise UnsafeArchiveError(
                    f"{zip_path.name} contains an unsafe member {info.filename!r} ({reason}); nothing was extracted. "
                    "The archive is not the expected one: do not unpack it by hand."
                )
        by_name: dict[str, list[zipfile.ZipInfo]] = {}
        for info in infos:
            if not info.is_dir():
                by_name.setdefault(PurePosixPath(info.filename.replace("\\", "/")).name, []).append(info)
        plan = []
        for spec in files:
            found = by_name.get(spec.name, [])
            if not found:
                if spec.required:
                    raise IntegrityError(f"{zip_path.name} does not contain {spec.name}: it is not the expected archive.")
                continue
            if len(found) > 1:
                names = ", ".join(i.filename for i in found)
                raise IntegrityError(f"{zip_path.name} holds several files named {spec.name} ({names}); cannot tell which.")
            plan.append((spec, found[0]))

        dest_dir.mkdir(parents=True, exist_ok=True)
        staged: list[tuple[Path, Path]] = []
        try:
            for spec, info in plan:
                if spec.size is not None and info.file_size != spec.size:
                    raise IntegrityError(
                        f"{info.filename} in {zip_path.name} has {info.file_size:,} bytes, expected {spec.size:,}."
                    )
                out = dest_dir / spec.name
                tmp = out.with_name(out.name + ".part")
                staged.append((tmp, out))
                digest = hashlib.sha256()
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    for block in iter(lambda: src.read(CHUNK), b""):
                        digest.update(block)
                        dst.write(block)
                if spec.sha256 and digest.hexdigest() != spec.sha256:
                    raise IntegrityError(
                        f"{info.filename} in {zip_path.name}: sha256 mismatch (expected {spec.sha256}, "
                        f"got {digest.hexdigest()})."
                    )
            for tmp, out in staged:
                os.replace(tmp, out)
        except BaseException:
            for tmp, _ in staged:
                if tmp.exists():
                    tmp.unlink()
            raise
    return [out for _, out in staged]

"""A minimal ComfyUI HTTP client (standard library only).

``queue_prompt`` posts an API-format workflow, ``wait`` follows it to the end and ``images`` fetches what its
output nodes saved. Progress comes from ComfyUI's websocket (a tiny read-only client below, so no extra
dependency); completion is always confirmed through ``/history``, so a dropped websocket only costs the
progress display.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


class ComfyUnreachableError(ConnectionError):
    """No ComfyUI answers at the given URL."""


class WorkflowRejectedError(RuntimeError):
    """ComfyUI refused the workflow at validation (``/prompt`` answered 400)."""

    def __init__(self, message: str, error: dict | None = None, node_errors: dict | None = None):
        super().__init__(message)
        self.error = error or {}
        self.node_errors = node_errors or {}


class WorkflowFailedError(RuntimeError):
    """A node raised while the workflow ran. ``details`` is ComfyUI's execution_error message."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


@dataclass
class ProgressEvent:
    """One step of a running workflow, as reported to ``on_progress``.

    kind: "start", "executing" (a node began), "progress" (value/max inside a node), "cached" (nodes
    skipped because their result was cached), "done".
    """

    kind: str
    prompt_id: str
    node_id: str | None = None
    node_type: str | None = None
    value: int | None = None
    max: int | None = None
    nodes: list[str] = field(default_factory=list)


@dataclass
class OutputImage:
    node_id: str
    filename: str
    subfolder: str
    type: str
    data: bytes = b""


ProgressCallback = Callable[[ProgressEvent], None]


def format_node_errors(node_errors: dict, workflow: dict | None = None) -> str:
    lines = []
    for node_id, info in (node_errors or {}).items():
        ctype = info.get("class_type") or (workflow or {}).get(node_id, {}).get("class_type", "?")
        for err in info.get("errors", []):
            detail = err.get("details") or ""
            lines.append(f"  node {node_id} ({ctype}): {err.get('message', '')}" + (f": {detail}" if detail else ""))
    return "\n".join(lines)


class ComfyClient:
    def __init__(self, url: str = "http://127.0.0.1:8188", *, timeout: float = 30.0, client_id: str | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex
        self._workflows: dict[str, dict] = {}
        self._events: _EventSocket | None = None

    # -- plain HTTP -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError, socket.timeout, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ComfyUnreachableError(
                f"Cannot reach ComfyUI at {self.url} ({reason}). Is it running? Start it, fix --server, "
                "or let the runner start one with --comfyui-dir."
            ) from exc

    def get_json(self, path: str) -> Any:
        status, data = self._request("GET", path)
        if status != 200:
            raise RuntimeError(f"ComfyUI answered {status} to GET {path}: {data[:500]!r}")
        return json.loads(data)

    def post_json(self, path: str, payload: Any) -> tuple[int, Any]:
        status, data = self._request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        try:
            return status, json.loads(data) if data else None
        except json.JSONDecodeError:
            return status, data.decode("utf-8", "replace")

    def system_stats(self) -> dict:
        return self.get_json("/system_stats")

    def object_info(self, node_class: str | None = None) -> dict:
        path = "/object_info" if node_class is None else "/object_info/" + urllib.parse.quote(node_class)
        return self.get_json(path)

    def models(self, folder: str) -> list[str]:
        """File names ComfyUI lists in a model folder (e.g. "checkpoints")."""
        return self.get_json("/models/" + urllib.parse.quote(folder))

    def history(self, prompt_id: str) -> dict:
        return self.get_json("/history/" + urllib.parse.quote(prompt_id)).get(prompt_id, {})

    def interrupt(self) -> None:
        self._request("POST", "/interrupt", b"")

    # -- workflows --------------------------------------------------------------------------------

    def queue_prompt(self, api_workflow: dict, *, track_progress: bool = True) -> str:
        """Submit an API-format workflow; returns its prompt id. Validation errors raise
        ``WorkflowRejectedError`` whose message lists every node ComfyUI complained about."""
        prompt_id = uuid.uuid4().hex
        if track_progress and self._events is None:
            self._events = _EventSocket.try_open(self.url, self.client_id)
        status, body = self.post_json(
            "/prompt", {"prompt": api_workflow, "client_id": self.client_id, "prompt_id": prompt_id}
        )
        if status != 200:
            if not isinstance(body, dict):
                raise WorkflowRejectedError(f"ComfyUI refused the workflow ({status}): {body}")
            error = body.get("error") or {}
            if isinstance(error, str):
                error = {"message": error}
            node_errors = body.get("node_errors") or {}
            msg = error.get("message", "invalid workflow")
            if error.get("details"):
                msg += f": {error['details']}"
            listed = format_node_errors(node_errors, api_workflow)
            raise WorkflowRejectedError(
                f"ComfyUI refused the workflow: {msg}" + (f"\n{listed}" if listed else ""), error, node_errors
            )
        self._workflows[prompt_id] = api_workflow
        return body.get("prompt_id", prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0, on_progress: ProgressCallback | None = None) -> dict:
        """Block until the workflow finished; returns its ``/history`` entry.

        Raises ``WorkflowFailedError`` with ComfyUI's exception message when a node failed, ``TimeoutError``
        (after interrupting it) when it ran past ``timeout``.
        """
        workflow = self._workflows.get(prompt_id, {})
        deadline = time.monotonic() + timeout
        next_poll = 0.0
        while True:
            now = time.monotonic()
            if now >= next_poll:
                entry = self.history(prompt_id)
                if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                    return self._finish(prompt_id, entry, on_progress)
                if entry.get("outputs") and not entry.get("status"):
                    return self._finish(prompt_id, entry, on_progress)
                next_poll = now + (1.0 if self._events else 0.25)
            if now > deadline:
                self.interrupt()
                raise TimeoutError(f"Workflow {prompt_id} did not finish within {timeout:.0f} s; it was interrupted.")
            if self._events is None:
                time.sleep(0.25)
                continue
            try:
                msg = self._events.receive(timeout=0.5)
            except OSError:
                log.debug("ComfyUI websocket closed; following the workflow through /history only")
                self._events.close()
                self._events = None
                continue
            if msg is not None and _is_end_of(msg, prompt_id):
                next_poll = 0.0  # confirm through /history right away
            if msg is not None and on_progress is not None:
                event = _to_event(msg, prompt_id, workflow)
                if event is not None:
                    on_progress(event)

    def _finish(self, prompt_id: str, entry: dict, on_progress: ProgressCallback | None) -> dict:
        raise_for_history(entry)
        if on_progress is not None:
            on_progress(ProgressEvent("done", prompt_id))
        return entry

    def output_images(self, prompt_id: str, entry: dict | None = None) -> list[OutputImage]:
        """The images the workflow's output nodes reported (SaveImage, PreviewImage, ...), with their bytes."""
        entry = entry if entry is not None else self.history(prompt_id)
        found = listed_images(entry)
        for img in found:
            img.data = self.view(img.filename, img.subfolder, img.type)
        return found

    def images(self, prompt_id: str) -> list[bytes]:
        return [img.data for img in self.output_images(prompt_id)]

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, data = self._request("GET", "/view?" + query)
        if status != 200:
            raise RuntimeError(f"ComfyUI could not send {subfolder}/{filename} ({type}): HTTP {status}")
        return data

    def upload_image(self, path_or_bytes: str | os.PathLike | bytes, name: str | None = None, *,
                     subfolder: str = "", overwrite: bool = True) -> str:
        """Upload into ComfyUI's input folder; returns the name to put in a LoadImage node."""
        if isinstance(path_or_bytes, (bytes, bytearray)):
            data, name = bytes(path_or_bytes), name or "upload.png"
        else:
            with open(path_or_bytes, "rb") as f:
                data = f.read()
            name = name or os.path.basename(os.fspath(path_or_bytes))
        boundary = uuid.uuid4().hex
        parts = []
        for field_name, value in (("overwrite", "true" if overwrite else "false"), ("subfolder", subfolder), ("type", "input")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"\r\n\r\n{value}\r\n'.encode())
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        status, body = self._request(
            "POST", "/upload/image", b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        if status != 200:
            raise RuntimeError(f"ComfyUI refused the upload of {name}: HTTP {status} {body[:300]!r}")
        info = json.loads(body)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def listed_images(entry: dict) -> list[OutputImage]:
    """The images a ``/history`` entry lists (without their bytes), in node id order."""
    found = []
    for node_id, outputs in sorted(entry.get("outputs", {}).items(), key=lambda kv: _node_sort_key(kv[0])):
        for img in outputs.get("images", []):
            found.append(OutputImage(node_id, img["filename"], img.get("subfolder", ""), img.get("type", "output")))
    return found


def raise_for_history(entry: dict) -> None:
    """Raise ``WorkflowFailedError`` with ComfyUI's message when a ``/history`` entry ended in an error."""
    status = entry.get("status", {})
    if status.get("status_str") == "error":
        details = {}
        for name, data in status.get("messages", []):
            if name in ("execution_error", "execution_interrupted"):
                details = data
        if details.get("exception_message") is None and details:
            raise WorkflowFailedError(f"Workflow was interrupted at node {details.get('node_id')}.", details)
        node = f"node {details.get('node_id')} ({details.get('node_type')})" if details else "a node"
        raise WorkflowFailedError(
            f"ComfyUI failed in {node}: {details.get('exception_type', 'error')}: "
            f"{str(details.get('exception_message', '')).strip()}",
            details,
        )


def _node_sort_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _is_end_of(msg: dict, prompt_id: str) -> bool:
    data = msg.get("data") or {}
    if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
        return False
    kind = msg.get("type")
    return kind in ("execution_success", "execution_error", "execution_interrupted") or (
        kind == "executing" and data.get("node") is None
    )


def _to_event(msg: dict, prompt_id: str, workflow: dict) -> ProgressEvent | None:
    kind, data = msg.get("type"), msg.get("data") or {}
    if not isinstance(data, dict) or data.get("prompt_id") not in (None, prompt_id):
        return None
    node = data.get("node")
    node_type = workflow.get(str(node), {}).get("class_type") if node is not None else None
    if kind == "execution_start":
        return ProgressEvent("start", prompt_id)
    if kind == "executing" and node is not None and data.get("prompt_id") == prompt_id:
        return ProgressEvent("executing", prompt_id, str(node), node_type)
    if kind == "progress" and data.get("prompt_id") == prompt_id:
        return ProgressEvent("progress", prompt_id, str(node), node_type, data.get("value"), data.get("max"))
    if kind == "execution_cached" and data.get("prompt_id") == prompt_id:
        return ProgressEvent("cached", prompt_id, nodes=[str(n) for n in data.get("nodes", [])])
    return None


class _EventSocket:
    """Read-only websocket client for ComfyUI's ``/ws`` (RFC 6455, text frames only, no extensions)."""

    def __init__(self, sock: socket.socket, leftover: bytes):
        self.sock = sock
        self.buf = leftover
        self.fragments: list[bytes] = []
        self.text_message = True

    @classmethod
    def try_open(cls, url: str, client_id: str) -> "_EventSocket | None":
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "http":
            return None  # https would need TLS; progress then comes only at the end
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
        try:
            sock = socket.create_connection((host, port), timeout=5)
            key = base64.b64encode(os.urandom(16)).decode()
            path = (parsed.path.rstrip("/") or "") + "/ws?clientId=" + urllib.parse.quote(client_id)
            sock.sendall(
                (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    raise OSError("closed during handshake")
                head += chunk
            header, leftover = head.split(b"\r\n\r\n", 1)
            if b" 101 " not in header.split(b"\r\n", 1)[0]:
                raise OSError(header.split(b"\r\n", 1)[0].decode(errors="replace"))
            return cls(sock, leftover)
        except OSError as exc:
            log.debug("No progress events from ComfyUI websocket: %s", exc)
            return None

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def receive(self, timeout: float) -> dict | None:
        """Next JSON message, or None when nothing arrived in ``timeout`` seconds.

        Once a frame's first two bytes are in, the frame is read whole (allowing 30 s): ComfyUI's frames are
        small and sent in one piece.
        """
        deadline = time.monotonic() + timeout
        try:
            head = self._read_exact(2, deadline)
        except socket.timeout:
            return None
        long_deadline = time.monotonic() + 30
        fin, opcode = head[0] & 0x80, head[0] & 0x0F
        masked, length = head[1] & 0x80, head[1] & 0x7F
        if length == 126:
            length = struct.unpack(">H", self._read_exact(2, long_deadline))[0]
        elif length == 127:
            length = struct.unpack(">Q", self._read_exact(8, long_deadline))[0]
        mask = self._read_exact(4, long_deadline) if masked else None
        payload = self._read_exact(length, long_deadline)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if opcode == 0x8:
            raise OSError("websocket closed by server")
        if opcode == 0x9:  # ping -> pong (client frames must be masked)
            self._send(0xA, payload)
            return None
        if opcode in (0x1, 0x2):  # first frame of a text / binary message
            self.fragments, self.text_message = [], opcode == 0x1
        if opcode in (0x0, 0x1, 0x2):
            self.fragments.append(payload)
            if not fin:
                return None
            data, self.fragments = b"".join(self.fragments), []
            if not self.text_message:
                return None  # binary messages carry preview images; not needed here
            try:
                return json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
        return None

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def close(self) -> None:
        try:
            self._send(0x8, b"")
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

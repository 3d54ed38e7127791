"""A ComfyUI client with a blocking API, on aiohttp (a ComfyUI requirement) for HTTP and the websocket.

``queue_prompt`` posts an API-format workflow, ``wait`` follows it to the end and ``images`` fetches what its
output nodes saved. Progress comes from ComfyUI's websocket; completion is always confirmed through
``/history``, so a dropped websocket only costs the progress display.

The aiohttp session lives on a private event loop in a daemon thread, so the blocking methods work from plain
scripts, from threads and from code that already runs an event loop; ``on_progress`` is called in the
caller's thread (it may call ``interrupt``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
import urllib.parse
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp

log = logging.getLogger(__name__)

_T = TypeVar("_T")


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._events: _EventStream | None = None

    # -- plain HTTP -------------------------------------------------------------------------------

    def _call(self, coro: Awaitable[_T]) -> _T:
        """Run ``coro`` on the client's loop thread and wait for its result."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="comfy-client", daemon=True)
            self._thread.start()
            self._loop = loop
            # A client dropped without close() still ends its thread.
            self._stop_loop = weakref.finalize(self, loop.call_soon_threadsafe, loop.stop)
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _session_(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _request(self, method: str, path: str, body: bytes | aiohttp.FormData | None = None,
                 headers: dict | None = None, timeout: float | None = None) -> tuple[int, bytes]:
        """``(status, body)`` of one HTTP request; an HTTP error status is returned, not raised."""
        async def go() -> tuple[int, bytes]:
            session = await self._session_()
            async with session.request(method, self.url + path, data=body, headers=headers or {},
                                       timeout=aiohttp.ClientTimeout(total=timeout or self.timeout)) as r:
                return r.status, await r.read()

        try:
            return self._call(go())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ComfyUnreachableError(
                f"Cannot reach ComfyUI at {self.url} ({type(exc).__name__}: {exc}). Is it running? Start it, "
                "fix --server, or let the runner start one with --comfyui-dir."
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
            self._events = self._open_events()
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
            except ConnectionError:
                log.debug("ComfyUI websocket closed; following the workflow through /history only")
                self._close_events()
                continue
            if msg is not None and ended_prompt(msg) == prompt_id:
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
        form = aiohttp.FormData()
        form.add_field("overwrite", "true" if overwrite else "false")
        form.add_field("subfolder", subfolder)
        form.add_field("type", "input")
        form.add_field("image", data, filename=name, content_type="application/octet-stream")
        status, body = self._request("POST", "/upload/image", form)
        if status != 200:
            raise RuntimeError(f"ComfyUI refused the upload of {name}: HTTP {status} {body[:300]!r}")
        info = json.loads(body)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    # -- progress events --------------------------------------------------------------------------

    def _open_events(self) -> _EventStream | None:
        """Connect to ``/ws`` with this client's id; None (progress only at the end) when that fails."""
        async def go() -> _EventStream:
            session = await self._session_()
            ws_url = self.url.replace("http", "ws", 1) + "/ws?clientId=" + urllib.parse.quote(self.client_id)
            ws = await session.ws_connect(ws_url, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5),
                                          heartbeat=30)
            stream = _EventStream(ws)
            stream.task = asyncio.get_running_loop().create_task(stream.follow())
            return stream

        try:
            return self._call(asyncio.wait_for(go(), 5))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.debug("No progress events from ComfyUI websocket: %s", exc)
            return None

    def _close_events(self) -> None:
        if self._events is not None:
            self._call(self._events.close())
            self._events = None

    def close(self) -> None:
        """Close the websocket, the HTTP session and the loop thread (the client reopens them when used again)."""
        if self._loop is None:
            return
        self._close_events()
        if self._session is not None:
            self._call(self._session.close())
            self._session = None
        self._stop_loop()
        self._thread.join(timeout=5)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> ComfyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def ended_prompt(msg: dict) -> str | None:
    """The prompt id a websocket message announces the end of (success, error, interrupt), else None."""
    data = msg.get("data") or {}
    if not isinstance(data, dict) or "prompt_id" not in data:
        return None
    kind = msg.get("type")
    if kind in ("execution_success", "execution_error", "execution_interrupted") or (
        kind == "executing" and data.get("node") is None
    ):
        return data["prompt_id"]
    return None


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


_CLOSED = object()  # queued when the websocket ends


class _EventStream:
    """ComfyUI's ``/ws`` read by a task on the client's loop into a thread-safe queue of JSON messages.

    aiohttp answers pings and joins fragmented frames; binary messages (previews) are dropped.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.messages: queue.Queue = queue.Queue()
        self.task: asyncio.Task | None = None

    async def follow(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    self.messages.put(json.loads(msg.data))
                except ValueError:
                    continue
        finally:
            self.messages.put(_CLOSED)

    def receive(self, timeout: float) -> dict | None:
        """Next JSON message, or None when nothing arrived in ``timeout`` seconds; ``ConnectionError`` once the
        websocket has closed."""
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg is _CLOSED:
            self.messages.put(_CLOSED)  # stays closed for later calls
            raise ConnectionError("ComfyUI websocket closed")
        return msg if isinstance(msg, dict) else None

    async def close(self) -> None:
        await self.ws.close()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

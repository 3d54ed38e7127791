"""One ComfyUI as the batch sees it: queue, follow, collect, upload once, cancel.

``ComfyBackend`` speaks ComfyUI's HTTP API through a *transport*: ``HttpTransport`` (aiohttp, with ComfyUI's
websocket telling when a prompt ends) for ``--server`` URLs and the embedded server, or the Ray actor proxy of
``ray_mode``. Completion is always confirmed through ``/history``, so a dropped websocket only costs latency.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import urllib.parse
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ..client import (
    OutputImage,
    WorkflowRejectedError,
    ended_prompt,
    format_node_errors,
    listed_images,
    raise_for_history,
)

log = logging.getLogger(__name__)

UPLOAD_SUBFOLDER = "facebooth_batch"


class ServerLost(ConnectionError):
    """The server stopped answering (crashed, killed, network gone)."""


class PromptLost(RuntimeError):
    """The server answers but knows nothing of the prompt (it restarted, or the post never arrived)."""


class Transport(Protocol):
    name: str

    async def open(self) -> None: ...

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None, timeout: float = 120.0) -> tuple[int, bytes]: ...

    async def wait_end(self, prompt_id: str, timeout: float) -> None:
        """Return when the server announces the end of ``prompt_id`` or after ``timeout`` seconds."""

    async def close(self) -> None: ...


class HttpTransport:
    """aiohttp session + one websocket per server (client id of this batch) that wakes waiters at a prompt's end."""

    def __init__(self, url: str):
        self.name = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self._session = None
        self._ws_task: asyncio.Task | None = None
        self._ended: dict[str, asyncio.Event] = {}

    async def open(self) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
            self._ws_task = asyncio.create_task(self._follow_events())

    async def request(self, method, path, *, body=None, headers=None, timeout=120.0):
        import aiohttp

        try:
            async with self._session.request(method, self.name + path, data=body, headers=dict(headers or {}),
                                             timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ServerLost(f"{self.name} does not answer ({type(exc).__name__}: {exc})") from exc

    def _event(self, prompt_id: str) -> asyncio.Event:
        return self._ended.setdefault(prompt_id, asyncio.Event())

    async def _follow_events(self) -> None:
        import aiohttp

        url = self.name.replace("http", "ws", 1) + "/ws?clientId=" + self.client_id
        while True:
            try:
                async with self._session.ws_connect(url, heartbeat=30) as ws:
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue  # binary frames are previews
                        try:
                            data = json.loads(msg.data)
                        except ValueError:
                            continue
                        ended = ended_prompt(data) if isinstance(data, dict) else None
                        if ended is not None:
                            self._event(ended).set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (the websocket is a latency aid; /history stays the truth)
                log.debug("websocket of %s: %s", self.name, exc)
            await asyncio.sleep(1.0)

    async def wait_end(self, prompt_id: str, timeout: float) -> None:
        event = self._event(prompt_id)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        else:
            self._ended.pop(prompt_id, None)

    async def close(self) -> None:
        if self._ws_task is not None:
            self._ws_task.cancel()
            await asyncio.gather(self._ws_task, return_exceptions=True)
            self._ws_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None


class ComfyBackend:
    """The batch's view of one server. ``inflight``: how many prompts it keeps queued there (pull balancing)."""

    def __init__(self, transport: Transport, inflight: int = 2):
        self.transport = transport
        self.inflight = inflight
        self._uploaded: dict[str, str] = {}
        self._upload_locks: dict[str, asyncio.Lock] = {}
        self.client_id = getattr(transport, "client_id", uuid.uuid4().hex)

    @property
    def name(self) -> str:
        return self.transport.name

    async def open(self) -> None:
        await self.transport.open()

    async def close(self) -> None:
        await self.transport.close()

    async def _json(self, method: str, path: str, payload: Any = None, timeout: float = 120.0) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else None
        status, data = await self.transport.request(method, path, body=body, headers=headers, timeout=timeout)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data.decode("utf-8", "replace")

    async def get(self, path: str, timeout: float = 120.0) -> Any:
        status, data = await self._json("GET", path, timeout=timeout)
        if status != 200:
            raise ServerLost(f"{self.name} answered {status} to GET {path}")
        return data

    async def alive(self) -> bool:
        try:
            await self.get("/system_stats", timeout=5)
            return True
        except ServerLost:
            return False

    async def object_info(self) -> dict:
        return await self.get("/object_info", timeout=300)

    # -- inputs -------------------------------------------------------------------------------------

    async def ensure_input(self, path: str | Path) -> str:
        """Upload a local image once per server, named by its content hash; returns the name for LoadImage."""
        data = Path(path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._uploaded:
            return self._uploaded[digest]
        async with self._upload_locks.setdefault(digest, asyncio.Lock()):
            if digest in self._uploaded:
                return self._uploaded[digest]
            filename = f"{digest[:24]}{Path(path).suffix.lower() or '.png'}"
            name = f"{UPLOAD_SUBFOLDER}/{filename}"
            query = urllib.parse.urlencode({"filename": filename, "subfolder": UPLOAD_SUBFOLDER, "type": "input"})
            status, _ = await self.transport.request("GET", "/view?" + query, timeout=60)
            if status != 200:  # not there from an earlier run: upload
                await self._upload(data, filename)
            self._uploaded[digest] = name
            return name

    async def _upload(self, data: bytes, filename: str) -> None:
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in (("overwrite", "true"), ("subfolder", UPLOAD_SUBFOLDER), ("type", "input"))
        ]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        status, body = await self.transport.request(
            "POST", "/upload/image", body=b"".join(parts),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=300)
        if status != 200:
            raise RuntimeError(f"{self.name} refused the upload of {filename}: HTTP {status} {body[:300]!r}")

    # -- prompts ------------------------------------------------------------------------------------

    async def submit(self, api: Mapping, prompt_id: str, extra_pnginfo: Mapping[str, Any]) -> None:
        payload = {"prompt": api, "client_id": self.client_id, "prompt_id": prompt_id,
                   "extra_data": {"extra_pnginfo": dict(extra_pnginfo)}}
        status, body = await self._json("POST", "/prompt", payload)
        if status == 200:
            return
        if not isinstance(body, dict):
            raise WorkflowRejectedError(f"ComfyUI refused the workflow ({status}): {body}")
        error = body.get("error") or {}
        error = {"message": error} if isinstance(error, str) else error
        msg = error.get("message", "invalid workflow") + (f": {error['details']}" if error.get("details") else "")
        listed = format_node_errors(body.get("node_errors") or {}, dict(api))
        raise WorkflowRejectedError(f"ComfyUI refused the workflow: {msg}" + (f"\n{listed}" if listed else ""),
                                    error, body.get("node_errors"))

    async def _finished_entry(self, prompt_id: str) -> dict | None:
        entry = (await self.get("/history/" + urllib.parse.quote(prompt_id))).get(prompt_id)
        if entry:
            status = entry.get("status") or {}
            if status.get("completed") or status.get("status_str") == "error" or (entry.get("outputs") and not status):
                return entry
        return None

    async def state(self, prompt_id: str) -> tuple[str, dict | None]:
        """('finished', history entry) | ('queued', None) | ('unknown', None)."""
        entry = await self._finished_entry(prompt_id)
        if entry is not None:
            return "finished", entry
        queue = await self.get("/queue")
        for item in (queue.get("queue_running") or []) + (queue.get("queue_pending") or []):
            if len(item) > 1 and item[1] == prompt_id:
                return "queued", None
        # Not queued: it either ended after the first look (ComfyUI moves it to the history atomically) or the
        # server never had it.
        entry = await self._finished_entry(prompt_id)
        return ("finished", entry) if entry is not None else ("unknown", None)

    async def result(self, prompt_id: str, timeout: float) -> tuple[dict, list[OutputImage]]:
        """Wait for the prompt, then return its history entry and its images with their bytes.

        Raises WorkflowFailedError (a node failed), PromptLost (the server forgot it), ServerLost, TimeoutError.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            kind, entry = await self.state(prompt_id)
            if kind == "finished":
                raise_for_history(entry)
                return entry, await self.download(entry)
            if kind == "unknown":
                raise PromptLost(f"{self.name} has no prompt {prompt_id} in its queue or history")
            if loop.time() > deadline:
                await self.cancel([prompt_id])
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s on {self.name}; cancelled")
            await self.transport.wait_end(prompt_id, 2.0)

    async def download(self, entry: dict) -> list[OutputImage]:
        """The saved images of a finished prompt (previews only when nothing was saved)."""
        listed = listed_images(entry)
        chosen = [img for img in listed if img.type == "output"] or listed
        for img in chosen:
            query = urllib.parse.urlencode({"filename": img.filename, "subfolder": img.subfolder, "type": img.type})
            status, data = await self.transport.request("GET", "/view?" + query, timeout=300)
            if status != 200:
                raise RuntimeError(f"{self.name} could not send {img.subfolder}/{img.filename}: HTTP {status}")
            img.data = data
        return chosen

    async def cancel(self, prompt_ids: list[str]) -> None:
        """Take our prompts off the server: delete the queued ones, interrupt the one running."""
        if not prompt_ids:
            return
        try:
            await self._json("POST", "/queue", {"delete": list(prompt_ids)}, timeout=10)
            for pid in prompt_ids:
                await self._json("POST", "/interrupt", {"prompt_id": pid}, timeout=10)
        except ServerLost:
            pass

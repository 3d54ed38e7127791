"""``--ray [ADDRESS]``: the batch on a Ray cluster. Ray is an optional extra (``pip install facebooth[cluster]``)
and is imported only here, only when asked for.

One actor per GPU (``num_gpus=1``; tests use CPU actors with ``num_gpus=0``) lays out a ComfyUI base folder on its
node with this pack (``prepare_base_dir``, as the embedded default does) and starts ComfyUI there. The driver keeps
the journal and the dispatcher; each actor is one more backend whose requests travel as actor calls
(``RayTransport``), so the driver needs no network route to the nodes' ports. Ray restarts a lost actor
(``max_restarts``); the prompts it had are then unknown to its new ComfyUI, and the dispatcher re-queues them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from .servers import ComfyBackend, ServerLost

log = logging.getLogger(__name__)


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("--ray needs Ray: pip install 'facebooth[cluster]' (or pip install ray).") from exc
    return ray


def _init(ray, address: str | None, kwargs: dict, tries: int = 5) -> None:
    """``ray.init``; a local Ray on a busy machine may miss Ray's fixed 30 s raylet start window: try again."""
    for attempt in range(1, tries + 1):
        try:
            ray.init(address=address, **kwargs)
            return
        except Exception as exc:  # Ray raises a bare Exception for this timeout
            if address is not None or "timed out during startup" not in str(exc) or attempt == tries:
                raise
            log.warning("Local Ray did not start in time (%s); trying again", exc)
            ray.shutdown()


class ComfyActor:
    """Runs one ComfyUI on its node (wrapped with ``ray.remote`` by ``RayCluster``)."""

    def __init__(self, comfyui_dir: str | None, checkpoint: str | None, cpu: bool, cache_dir: str | None,
                 startup_timeout: float = 600.0):
        from ..local_setup import prepare_base_dir
        from ..server import ComfyServer, check_comfyui_dir

        comfyui = check_comfyui_dir(comfyui_dir or os.environ.get("COMFYUI_DIR"))
        base = tempfile.mkdtemp(prefix="facebooth-ray-")
        setup = prepare_base_dir(base, checkpoint=checkpoint, comfyui_dir=comfyui, cache_dir=cache_dir)
        self.substitutions = setup.substitutions
        self.server = ComfyServer(comfyui, base, cpu=cpu, die_with_parent=True, startup_timeout=startup_timeout)
        # PR_SET_PDEATHSIG follows the thread that started the child: start ComfyUI from a thread that lives as
        # long as this actor's process, so ComfyUI ends with the actor however it ends.
        started, failure = threading.Event(), []

        def keeper() -> None:
            try:
                self.server.start()
            except BaseException as exc:  # noqa: BLE001 (re-raised by __init__ below)
                failure.append(exc)
            started.set()
            threading.Event().wait()

        threading.Thread(target=keeper, name="comfyui-keeper", daemon=True).start()
        started.wait()
        if failure:
            raise failure[0]

    def info(self) -> dict:
        import ray

        return {"url": self.server.url, "node": ray.util.get_node_ip_address(), "substitutions": self.substitutions}

    def request(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str], timeout: float):
        return self.server.client._request(method, path, body, dict(headers), timeout)

    def wait_end(self, prompt_id: str, timeout: float) -> None:
        """Loopback polling of /history: the driver's wait wakes as soon as the prompt has ended here."""
        deadline = time.monotonic() + timeout
        path = "/history/" + urllib.parse.quote(prompt_id)
        while time.monotonic() < deadline:
            status, data = self.server.client._request("GET", path, None, {}, 10)
            if status == 200 and len(data) > 2:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.stop()


class RayTransport:
    """ComfyUI requests as calls to its actor."""

    def __init__(self, handle, name: str):
        self.handle = handle
        self.name = name

    async def open(self) -> None:
        return None

    async def request(self, method, path, *, body=None, headers=None, timeout=120.0):
        try:
            return await self.handle.request.remote(method, path, body, dict(headers or {}), timeout)
        except Exception as exc:  # the actor died (RayActorError) or its ComfyUI does not answer (RayTaskError)
            raise ServerLost(f"{self.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc

    async def wait_end(self, prompt_id: str, timeout: float) -> None:
        try:
            await self.handle.wait_end.remote(prompt_id, timeout)
        except Exception:  # noqa: BLE001 (a latency aid; request() reports a lost actor)
            await asyncio.sleep(min(timeout, 1.0))

    async def close(self) -> None:
        return None


class RayCluster:
    def __init__(self, ray, handles: list, infos: list[dict], owns_ray: bool):
        self.ray = ray
        self.handles = handles
        self.infos = infos
        self.owns_ray = owns_ray

    @classmethod
    def start(cls, address: str | None = None, *, actors: int | None = None, gpus_per_actor: float = 1.0,
              comfyui_dir: str | None = None, checkpoint: str | None = None, cache_dir: str | None = None,
              max_restarts: int = 2, init_kwargs: Mapping[str, Any] | None = None) -> RayCluster:
        ray = import_ray()
        owns = not ray.is_initialized()
        if owns:
            _init(ray, address or None, dict(init_kwargs or {}))
        if actors is None:
            gpus = ray.cluster_resources().get("GPU", 0)
            actors = int(gpus // gpus_per_actor) if gpus_per_actor > 0 else 0
            if actors < 1:
                raise RuntimeError("The Ray cluster has no GPU. Pass --ray-actors N --ray-gpus-per-actor 0 for CPU actors.")
        remote_cls = ray.remote(ComfyActor)
        handles = [
            remote_cls.options(num_gpus=gpus_per_actor, num_cpus=1, max_restarts=max_restarts, max_concurrency=32,
                               name=None).remote(comfyui_dir, checkpoint, gpus_per_actor == 0, cache_dir)
            for _ in range(actors)
        ]
        log.info("Starting %d Ray actor(s), each with a ComfyUI (%s GPU each)", actors, gpus_per_actor)
        try:
            infos = ray.get([h.info.remote() for h in handles])
        except Exception as exc:
            for h in handles:
                ray.kill(h)
            if owns:
                ray.shutdown()
            raise RuntimeError(f"A Ray actor could not start ComfyUI: {exc}") from exc
        for info in infos:
            log.info("Ray actor on %s: ComfyUI at %s", info["node"], info["url"])
        return cls(ray, handles, infos, owns)

    @property
    def substitutions(self) -> dict:
        return dict(self.infos[0]["substitutions"])

    def backends(self, inflight: int = 2) -> list[ComfyBackend]:
        return [ComfyBackend(RayTransport(h, f"ray://{info['node']}/actor{i}"), inflight)
                for i, (h, info) in enumerate(zip(self.handles, self.infos))]

    def shutdown(self) -> None:
        try:
            self.ray.get([h.stop.remote() for h in self.handles], timeout=60)
        except Exception as exc:  # noqa: BLE001 (they are killed next anyway)
            log.debug("Ray actors did not stop cleanly: %s", exc)
        for h in self.handles:
            self.ray.kill(h)
        if self.owns_ray:
            self.ray.shutdown()

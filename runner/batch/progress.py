"""The progress display: jobs done/failed of the total, images/min per server, ETA.

On a terminal it redraws one line on stderr; otherwise (logs, CI) it logs a line every ``every`` seconds.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict, deque

from .dispatcher import Events

log = logging.getLogger(__name__)

WINDOW_S = 120.0  # rates are measured over the last two minutes


class Progress(Events):
    def __init__(self, total: int, done: int = 0, failed: int = 0, *, stream=None, every: float = 10.0):
        self.total, self.done_count, self.failed_count = total, done, failed
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every
        self.start = time.monotonic()
        self.new_done = 0
        self.images: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.lost: set[str] = set()
        self._last = 0.0

    # -- events -------------------------------------------------------------------------------------

    def done(self, server: str, key: str, images: int) -> None:
        self.done_count += 1
        self.new_done += 1
        self.images[server].append((time.monotonic(), images))
        self.render()

    def failed(self, server: str, key: str, error: str) -> None:
        self.failed_count += 1
        first = error.strip().splitlines()[0] if error.strip() else "error"
        log.warning("job failed on %s: %s", server, first)
        self.render()

    def requeued(self, server: str, key: str, reason: str) -> None:
        log.info("job given back by %s: %s", server, reason)

    def server_lost(self, server: str, reason: str) -> None:
        self.lost.add(server)
        self.render(force=True)

    # -- figures ------------------------------------------------------------------------------------

    def images_per_minute(self, server: str, now: float | None = None) -> float:
        now = now or time.monotonic()
        window = self.images[server]
        while window and now - window[0][0] > WINDOW_S:
            window.popleft()
        span = max(min(WINDOW_S, now - self.start), 10.0)  # a floor keeps the first seconds from reading as huge
        return 60.0 * sum(n for _, n in window) / span

    def eta_seconds(self) -> float | None:
        left = self.total - self.done_count - self.failed_count
        elapsed = max(time.monotonic() - self.start, 10.0)
        if self.new_done == 0 or left <= 0:
            return None if left > 0 else 0.0
        return left * elapsed / self.new_done

    def line(self) -> str:
        eta = self.eta_seconds()
        eta_text = "--" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        servers = "  ".join(
            f"{name.split('://')[-1]}: {self.images_per_minute(name):.1f} img/min" + (" (lost)" if name in self.lost else "")
            for name in sorted(self.images.keys() | self.lost)
        )
        width = 20
        filled = int(width * (self.done_count + self.failed_count) / max(1, self.total))
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.done_count} done, {self.failed_count} failed "
                f"of {self.total}  ETA {eta_text}  {servers}")

    def render(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
        elif force or now - self._last >= self.every:
            self._last = now
            log.info("%s", self.line())

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        log.info("%s", self.line())

"""The live push: the viewers of /_sidecar/live and the one coalesced snapshot they share.

Why push and not poll: the page (and `sidecar top`) should cost nothing while
nobody looks. Nothing here runs on a timer of its own. After a call completes
(ProxyState.after_call), the sidecar's own state changes (an agent attaching
or leaving) or the monitor emits an event, `PushHub.changed` arms one timer,
and only while a viewer is connected; the timer builds one snapshot and wakes
every viewer, at most once per PUSH_INTERVAL. The hub makes the SSE frames;
the live page's route writes them to each viewer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import AsyncIterator

import orjson
from aiohttp import web

from .live_snapshot import snapshot
from .redact import redact
from .state import ProxyState

PUSH_INTERVAL = 0.5          # seconds: at most two pushes a second, however busy the sidecar
PUSH_TIMES = 256             # pushes whose build time `timings` reports


class PushHub:
    """The viewers of /_sidecar/live and the one coalesced push they share."""

    def __init__(self, state: ProxyState):
        self.state = state
        self.viewers: set[asyncio.Event] = set()
        self.payload = b""
        self.timer: asyncio.TimerHandle | None = None
        self.last = 0.0
        self.closing = False
        # How long the latest pushes took to build: wall time, and the loop thread's CPU time (the work itself;
        # on a busy machine the wall time also counts waiting for a core).
        self.push_ms: deque[float] = deque(maxlen=PUSH_TIMES)
        self.push_cpu_ms: deque[float] = deque(maxlen=PUSH_TIMES)

    def changed(self, _event: dict | None = None) -> None:
        """Something happened: push soon, if anyone is watching and no push is already due."""
        if not self.viewers or self.timer is not None:
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(max(0.0, self.last + PUSH_INTERVAL - loop.time()), self._push)

    def _push(self) -> None:
        self.timer = None
        self.last = asyncio.get_running_loop().time()
        started, cpu = time.perf_counter(), time.thread_time()
        self.payload = self._frame()
        self.push_ms.append((time.perf_counter() - started) * 1000)
        self.push_cpu_ms.append((time.thread_time() - cpu) * 1000)
        for viewer in self.viewers:
            viewer.set()

    def _frame(self) -> bytes:
        return b"data: " + redact(orjson.dumps(snapshot(self.state), option=orjson.OPT_NON_STR_KEYS)) + b"\n\n"

    def timings(self) -> dict:
        """The viewers, and what the latest pushes took on the event loop (the bench reads them)."""
        times, cpu = sorted(self.push_ms), sorted(self.push_cpu_ms)
        return {"viewers": len(self.viewers), "pushes": len(times),
                "p50_ms": round(times[len(times) // 2], 3) if times else None,
                "max_ms": round(times[-1], 3) if times else None,
                "cpu_p50_ms": round(cpu[len(cpu) // 2], 3) if cpu else None,
                "cpu_max_ms": round(cpu[-1], 3) if cpu else None}

    def _join(self, viewer: asyncio.Event) -> asyncio.Future:
        """The viewer is in; the future is done once the live figures are kept (rolling.py)."""
        if not self.viewers:
            self.state.monitor.listeners.append(self.changed)
        self.viewers.add(viewer)
        return self.state.rolling.watch()

    def _leave(self, viewer: asyncio.Event) -> None:
        self.viewers.discard(viewer)
        self.state.rolling.unwatch()
        if not self.viewers:
            self.state.monitor.listeners.remove(self.changed)
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    async def frames(self) -> AsyncIterator[bytes]:
        """One viewer's SSE frames: the current state at once, then every push, until shutdown.

        Close it (contextlib.aclosing) when the viewer leaves: that is what makes it leave the hub."""
        viewer = asyncio.Event()
        kept = self._join(viewer)
        try:
            await kept
            yield b"retry: 2000\n" + self._frame()
            while True:
                await viewer.wait()
                viewer.clear()
                if self.closing:
                    return
                yield self.payload
        finally:
            self._leave(viewer)

    async def close(self, _app: web.Application) -> None:
        """on_shutdown: end the open streams, so stopping the sidecar does not wait for viewers."""
        self.closing = True
        for viewer in self.viewers:
            viewer.set()


PUSH_HUB = web.AppKey("push_hub", PushHub)

"""One upstream answer in flight, shared by every identical request meanwhile.

The upstream call runs in its own task and appends what arrives; each waiting
request relays from it at its own pace (a late joiner first gets what it
missed, then the rest as it comes). The agent that started it is just the
first subscriber: if it disconnects, the others keep getting the answer; when
the last one leaves, the upstream call is cancelled so no tokens are spent on
an answer nobody reads.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Hashable

from multidict import CIMultiDict


@dataclass(slots=True, frozen=True)
class Head:
    status: int
    reason: str | None
    headers: CIMultiDict
    stream: bool


class Flight:
    __slots__ = ("key", "head", "error", "chunks", "done", "failed", "subscribers", "task", "_waiters")

    def __init__(self, key: Hashable | None):
        self.key = key
        self.head: Head | None = None
        self.error: BaseException | None = None   # the call failed before any answer
        self.chunks: list[bytes] = []
        self.done = False
        self.failed = False          # ended without a proper end: subscribers drop their connection
        self.subscribers = 0
        self.task: asyncio.Task | None = None
        # One future per waiting subscriber: a subscriber that goes away cancels only its own.
        self._waiters: list[asyncio.Future] = []

    # -- producer side --
    def start_head(self, head: Head) -> None:
        if self.head is None:
            self.head = head
            self._wake()

    def append(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._wake()

    def finish(self, failed: bool = False) -> None:
        self.done = True
        self.failed = failed
        self._wake()

    def abort(self, exc: BaseException) -> None:
        """The call failed before any answer: every subscriber gets `exc`."""
        if self.head is None:
            self.error = exc
        self.finish(failed=True)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _changed(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    # -- subscriber side --
    def join(self) -> None:
        self.subscribers += 1

    def leave(self) -> None:
        self.subscribers -= 1
        if self.subscribers <= 0 and not self.done and self.task is not None:
            self.task.cancel()

    async def wait_head(self) -> Head:
        """The answer's status and headers, once the upstream sent them (or the call's error)."""
        while self.head is None and self.error is None:
            await self._changed()
        if self.head is None:
            raise self.error
        return self.head

    async def stream(self) -> AsyncIterator[bytes]:
        """Every chunk, from the first, as it becomes available."""
        sent = 0
        while True:
            while sent < len(self.chunks):
                yield self.chunks[sent]
                sent += 1
            if self.done:
                return
            await self._changed()

    async def body(self) -> bytes:
        async for _ in self.stream():
            pass
        return b"".join(self.chunks)


class Flights:
    """The calls in flight that later identical requests may join."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, Flight] = {}

    def find(self, key: Hashable) -> Flight | None:
        return self._by_key.get(key)

    def add(self, flight: Flight) -> None:
        self._by_key[flight.key] = flight

    def remove(self, flight: Flight) -> None:
        if self._by_key.get(flight.key) is flight:
            del self._by_key[flight.key]

    def __len__(self) -> int:
        return len(self._by_key)

"""One upstream answer in flight, shared by every identical request meanwhile.

The upstream exchange runs in its own task and appends what arrives; each
waiting request relays from it at its own pace (a late joiner first gets what
it missed, then the rest as it comes). The agent that started it is just the
first subscriber: if it disconnects, the others keep getting the answer; when
the last one leaves, the exchange is cancelled so no tokens are spent on an
answer nobody reads. Every subscriber gets the same outcome: the answer, the
same error before the head, or the same cut after it. A flight that has ended,
or is being cancelled, is closed: nobody can join it any more.
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
    sse: bool              # an event stream (by its content-type): parsed as events, stored as a stream
    incremental: bool      # relayed chunk by chunk as it arrives (a stream, or a body of unknown length)


class Flight:
    __slots__ = ("key", "head", "error", "chunks", "done", "failed", "closed", "answer", "subscribers", "task",
                 "_waiters")

    def __init__(self, key: Hashable | None):
        self.key = key
        self.head: Head | None = None
        self.error: BaseException | None = None   # the call failed before any answer
        self.chunks: list[bytes] = []
        self.done = False
        self.failed = False          # ended without a proper end: subscribers cut their connection
        self.closed = False          # ended or cancelled: no new subscriber
        self.answer: dict | None = None   # the complete answer as JSON, for each subscriber's checkpoint
        self.subscribers = 0
        self.task: asyncio.Task | None = None
        # One future per waiting subscriber: a subscriber that goes away cancels only its own.
        self._waiters: list[asyncio.Future] = []

    # -- producer side --
    # A body relayed whole (not incremental) is of use to nobody before it has ended: its head and chunks
    # wake no subscriber, its end does (one wake-up per subscriber instead of one per step).
    def start_head(self, head: Head) -> None:
        if self.head is None:
            self.head = head
            if head.incremental:
                self._wake()

    def append(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        if self.head is None or self.head.incremental:
            self._wake()

    def finish(self, failed: bool = False) -> None:
        if self.done:
            return
        self.done = self.closed = True
        self.failed = failed
        self._wake()

    def abort(self, exc: BaseException) -> None:
        """The call failed: before the head every subscriber gets `exc`, after it a cut."""
        if self.head is None and self.error is None:
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
        if self.subscribers <= 0 and not self.done:
            self.closed = True
            if self.task is not None:
                self.task.cancel()

    async def wait_head(self) -> Head:
        """The answer's status and headers, once the upstream sent them (or the call's error); for a body
        relayed whole, once it has ended."""
        while self.head is None and not self.done:
            await self._changed()
        if self.head is None:
            raise self.error or RuntimeError("flight ended without an answer or an error")
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
        while not self.done:
            await self._changed()
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)


class Flights:
    """The calls in flight that later identical requests may join."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, Flight] = {}

    def find(self, key: Hashable) -> Flight | None:
        flight = self._by_key.get(key)
        if flight is not None and flight.closed:
            del self._by_key[key]
            return None
        return flight

    def add(self, flight: Flight) -> None:
        self._by_key[flight.key] = flight

    def remove(self, flight: Flight) -> None:
        if self._by_key.get(flight.key) is flight:
            del self._by_key[flight.key]

    def __len__(self) -> int:
        return len(self._by_key)

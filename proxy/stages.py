"""The side stages of a call's way: small units with one shape, run in order by the pipeline.

Each stage has the hooks it needs, named after the moments of a call (in the
manner of mitmproxy's addons): `request` (before it goes upstream; returning
an answer ends the way, as a cache hit does), `head`, `chunk` and `end` of
the answer, and `done` (after its last byte, from the loop). A hook returns
at once; one that must wait returns an awaitable (a coroutine), which the
pipeline awaits before the call moves on: the common case costs no await. Every stage here
is a side stage: if one fails, the pipeline reports a fault and runs the call
on as if that stage were off. A stage decides nothing by raising, except with
a `SidecarError` (a replay-mode miss), which is a decision, not a failure.
"""

from __future__ import annotations

from typing import Awaitable

from . import replay
from .call import Call
from .capture import Capture as AnswerCapture
from .convert import message_of
from .flight import Head

HOOKS = ("request", "head", "chunk", "end", "done")


class Stage:
    """A stage; the hooks it leaves alone are not run."""

    name = "stage"

    def __init__(self, state):
        self.state = state

    def request(self, call: Call) -> Awaitable[replay.Replay | None] | None:
        """Before the call goes upstream; an answer (awaited) returned here ends its way."""

    def head(self, call: Call, head: Head) -> Awaitable[None] | None:
        """The upstream answer's status and headers arrived (misses only)."""

    def chunk(self, call: Call, chunk: bytes) -> Awaitable[None] | None:
        """One chunk of the upstream answer, before it is relayed (misses only)."""

    def end(self, call: Call) -> Awaitable[None] | None:
        """The answer is over: from the upstream, the cache, or the flight this call joined."""

    def done(self, call: Call) -> None:
        """The last byte has gone out to the agent."""


class Restore(Stage):
    """A restarted agent's conversation gets its checkpointed history in front."""

    name = "restore"

    def request(self, call: Call) -> None:
        self.state.sessions.restore(call)


class CacheKey(Stage):
    """Whether the call reads and writes the cache, and its key."""

    name = "cache key"

    def request(self, call: Call) -> Awaitable[None] | None:
        return self.state.cache.plan(call, call.headers)


class CacheLookup(Stage):
    """A stored answer this request can be served: the way ends here."""

    name = "cache lookup"

    async def request(self, call: Call) -> replay.Replay | None:
        cache = self.state.cache
        entry = await cache.lookup(call)
        if entry is None:
            return None
        hit = replay.prepare(call, entry, cache.settings.replay_pacing)
        if hit is None:
            cache.refuse_in_replay(call)   # stored, but not servable to this request: a miss
            return None
        replay.account(call, entry)
        call.entry = entry
        return hit


class Budget(Stage):
    """A call that would go upstream past a budget is refused (hits were served before this)."""

    name = "budget"

    def request(self, call: Call) -> None:
        self.state.budgets.check(call)


class Capture(Stage):
    """Completeness, well-formedness, usage and first token of an upstream answer."""

    name = "capture"

    def head(self, call: Call, head: Head) -> None:
        if 200 <= head.status < 300:
            keep_pacing = head.sse and self.state.cache.should_store(call)
            call.capture = AnswerCapture(call, head.sse, head.headers.get("content-encoding", ""), keep_pacing)

    def chunk(self, call: Call, chunk: bytes) -> None:
        if call.capture is not None and call.capture.feed(call, chunk) and call.capture.storable:
            call.answer = call.capture.answer

    def end(self, call: Call) -> None:
        if call.capture is not None and call.capture.end(call, call.body_out) and call.capture.storable:
            call.answer = call.capture.answer


class Checkpoint(Stage):
    """Each completed turn on disk, once, before the answer's last byte reaches the agent."""

    name = "checkpoint"

    def chunk(self, call: Call, chunk: bytes) -> Awaitable[None] | None:
        # the chunk that completed a stream: checkpointed before it is relayed
        return self._once(call) if call.answer is not None else None

    def end(self, call: Call) -> Awaitable[None] | None:
        sessions = self.state.sessions
        if call.answer is None and call.entry is not None and sessions.applies(call):
            if sessions.has_turn(call):   # a hit repeating the turn just kept: nothing new
                return None
            call.answer = message_of(call.entry, call.route.api)   # a hit: the stored answer
        return self._once(call) if call.answer is not None else None

    def _once(self, call: Call) -> Awaitable[None] | None:
        if call.checkpointed or not self.state.sessions.applies(call):
            return None
        call.checkpointed = True
        return self.state.sessions.checkpoint(call, call.answer, call.headers)


class Store(Stage):
    """A complete, well-formed 2xx answer from the upstream goes into the cache."""

    name = "store"

    def end(self, call: Call) -> None:
        if call.capture is not None and call.capture.storable and call.head is not None:
            self.state.cache.save(call, call.head, call.capture, call.body_out)


class Record(Stage):
    """The call's record, the live aggregates and the thresholds."""

    name = "record"

    def done(self, call: Call) -> None:
        self.state.finish(call)


class Telemetry(Stage):
    """The call as an OpenTelemetry GenAI span and measurements (proxy/telemetry.py), when export is on."""

    name = "telemetry"

    def done(self, call: Call) -> None:
        exporter = self.state.telemetry
        if exporter is not None:
            agent = self.state.monitor.agents.get(call.route.agent)
            exporter.export(call, agent.traceparent if agent is not None else "")

"""Overload walls: while the upstream answers 429/503/529 to everything, one probe at a time goes out.

A circuit per upstream budget (API and model). Closed, calls pass. After
`OPEN_AFTER` overload answers in a row (no other answer between them), it
opens: calls are held in line, and one at a time, the oldest, goes out as a
probe, after a backoff that doubles per failed probe from [retry] base_delay
up to max_delay or 8 s, whichever is less (the SDKs' own longest backoff; never
sooner than the upstream's retry-after). The first
answer that is not an overload closes it, and the held calls go on to the
limiter, which lets them out at the concurrency it learned before the wall
(a wall is not a signal about our concurrency, so it does not lower it).

A held call waits at most until its deadline: [retry] max_total after it
arrived, and never as long as the clients' own timeout (the SDKs' default is
600 s). One that cannot go by then gets the upstream's own last overload
answer, byte for byte, or, if none was kept, an API-shaped `sidecar:` 529.
Everything is timers and futures: nothing polls.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from multidict import CIMultiDict

from .config import RetrySection
from .errors import UpstreamError

OVERLOAD = frozenset({429, 503, 529})
OPEN_AFTER = 3               # overload answers in a row that open a circuit
CLIENT_TIMEOUT = 600.0       # the official SDKs' default request timeout, in seconds
HOLD_SHARE = 0.9             # a held call answers before this share of the clients' timeout
PROBE_MAX_DELAY = 8.0        # the SDKs' own longest backoff: a wall is probed at least as often as one agent would
MAX_ERROR_BODY = 64 * 1024   # bytes of an overload answer kept to answer held calls with


@dataclass(slots=True, frozen=True)
class LastError:
    """The upstream's own overload answer, kept to answer the calls that waited for it in vain."""
    status: int
    reason: str | None
    headers: CIMultiDict
    body: bytes


class WallHeld(Exception):
    """A call held by an open circuit reached its deadline; `last` is what the upstream last said."""

    def __init__(self, last: LastError | None, message: str):
        super().__init__(message)
        self.last = last
        self.error = UpstreamError("overloaded", message, retry_after=1.0)


@dataclass(slots=True, eq=False)
class Circuit:
    key: str
    failures: int = 0                 # overload answers in a row
    opened: float = 0.0               # monotonic; 0 = closed
    probing: bool = False             # a probe is out
    delay: float = 0.0                # before the next probe
    next_probe: float = 0.0           # monotonic
    waiters: deque = field(default_factory=deque)
    timer: asyncio.TimerHandle | None = None
    last: LastError | None = None
    last_status: int = 0
    probes: int = 0

    @property
    def open(self) -> bool:
        return self.opened > 0


class Circuits:
    """Every circuit, and the `upstream_overloaded` event while any of them is open."""

    def __init__(self, settings: RetrySection, on_change: Callable[..., None] | None = None):
        self.settings = settings
        self.on_change = on_change or (lambda crossed, **detail: None)
        self.circuits: dict[str, Circuit] = {}
        self.held = 0          # calls ever held by an open circuit
        self.timed_out = 0     # held calls answered with the upstream's last error

    def deadline(self, received: float, attempts_deadline: float) -> float:
        """Monotonic time by which a held call must be answered."""
        return min(attempts_deadline, received + CLIENT_TIMEOUT * HOLD_SHARE)

    # -- before an attempt --
    async def admit(self, key: str, deadline: float) -> bool:
        """Return when this attempt may go out (True: as the probe); raise WallHeld at the deadline."""
        circuit = self.circuits.get(key)
        if circuit is None or not circuit.open or not self.settings.overload_circuit:
            return False
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        circuit.waiters.append(waiter)
        self.held += 1
        expiry = loop.call_later(max(0.0, deadline - time.monotonic()), _resolve, waiter, None)
        try:
            self._dispatch(circuit)
            granted = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.result() == "probe":
                self._probe_over(circuit)   # granted the probe just as the caller went away
            raise
        finally:
            expiry.cancel()
            if waiter in circuit.waiters:
                circuit.waiters.remove(waiter)
        if granted is None:
            self.timed_out += 1
            waited = time.monotonic() - circuit.opened if circuit.open else 0.0
            raise WallHeld(circuit.last, f"sidecar: the upstream has answered every call overloaded "
                                         f"({circuit.last_status}) for {waited:.0f} s; this call waited its "
                                         f"limit ([retry] max_total = {self.settings.max_total:g} s) for it "
                                         f"to recover. Retry later")
        return granted == "probe"

    # -- after an attempt --
    def answered(self, key: str, probe: bool, status: int, last: LastError | None = None,
                 retry_after: float | None = None) -> None:
        """An attempt's answer: an overload counts toward opening; anything else closes the circuit."""
        circuit = self.circuits.get(key)
        if not self.settings.overload_circuit:
            return
        if status not in OVERLOAD:
            if circuit is not None:
                self._close(circuit)
            return
        if circuit is None:
            if len(self.circuits) >= 256:
                self._forget_closed()
            circuit = self.circuits[key] = Circuit(key)
        circuit.failures += 1
        circuit.last_status = status
        if last is not None:
            circuit.last = last
        now = time.monotonic()
        if not circuit.open and circuit.failures >= OPEN_AFTER:
            circuit.opened, circuit.delay = now, self.settings.base_delay
            circuit.next_probe = now + max(circuit.delay, retry_after or 0.0)
            self._report()
        elif circuit.open and probe:
            circuit.delay = min(self.settings.max_delay, PROBE_MAX_DELAY, circuit.delay * 2)
            circuit.next_probe = now + max(circuit.delay, retry_after or 0.0)
        if probe:
            self._probe_over(circuit)

    def unanswered(self, key: str, probe: bool) -> None:
        """The attempt ended with no answer (a connection failure, a cancel): the probe slot is free again."""
        circuit = self.circuits.get(key)
        if probe and circuit is not None:
            self._probe_over(circuit)

    # -- the line --
    def _probe_over(self, circuit: Circuit) -> None:
        circuit.probing = False
        self._dispatch(circuit)

    def _dispatch(self, circuit: Circuit) -> None:
        """Closed: everyone goes. Open: the oldest waiter goes as the probe, once the backoff has passed."""
        if circuit.timer is not None:
            circuit.timer.cancel()
            circuit.timer = None
        while circuit.waiters and circuit.waiters[0].done():
            circuit.waiters.popleft()
        if not circuit.open:
            while circuit.waiters:
                _resolve(circuit.waiters.popleft(), "go")
            return
        if circuit.probing or not circuit.waiters:
            return
        wait = circuit.next_probe - time.monotonic()
        if wait > 0:
            circuit.timer = asyncio.get_running_loop().call_later(wait, self._dispatch, circuit)
            return
        circuit.probing = True
        circuit.probes += 1
        _resolve(circuit.waiters.popleft(), "probe")

    def _close(self, circuit: Circuit) -> None:
        circuit.failures = 0
        if circuit.open:
            circuit.opened = 0.0
            circuit.probing = False
            self._report()
        self._dispatch(circuit)

    def _forget_closed(self) -> None:
        for key in [k for k, c in self.circuits.items() if not c.open and not c.waiters]:
            del self.circuits[key]

    def _report(self) -> None:
        walls = [c for c in self.circuits.values() if c.open]
        self.on_change(bool(walls), upstreams=[c.key for c in walls],
                       status=walls[0].last_status if walls else None, held=self.holding())

    def holding(self) -> int:
        return sum(1 for c in self.circuits.values() for w in c.waiters if not w.done())

    def snapshot(self) -> dict:
        now = time.monotonic()
        return {"open": [{"upstream": c.key, "status": c.last_status, "since_s": round(now - c.opened, 1),
                          "held": sum(1 for w in c.waiters if not w.done()), "probes": c.probes,
                          "next_probe_in_s": round(max(0.0, c.next_probe - now), 1)}
                         for c in self.circuits.values() if c.open],
                "holding": self.holding(), "held": self.held, "timed_out": self.timed_out}


def _resolve(waiter: asyncio.Future, outcome) -> None:
    if not waiter.done():
        waiter.set_result(outcome)

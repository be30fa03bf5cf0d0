"""Dollar budgets: `[limits] budget_usd` in total, per day, per agent and per session.

What this sidecar has spent since it started is summed per scope as calls
complete (a call's cost is known at its end, so a call that starts under its
budget is finished, never cut); `day` and `session` also count what today's
records in the state directory say earlier sidecars spent. Past a budget, a call that would go upstream
is refused before it leaves, with a 402 in the API's own shape (Anthropic's
`billing_error`; `x-should-retry: false`), which the official SDKs and Claude
Code do not retry. Cache hits cost nothing and are served before this check.
`budget_warning` is raised at 80 % of a budget and `budget_exceeded` at 100 %,
once each per scope and key. A day is the local calendar day.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from .call import Call
from .config import budgets
from .conversation import session_id
from .errors import Refusal
from .events import make_event
from .sessions import Sessions

WARN_AT = 0.8
FREE = ("/count_tokens", ":countTokens")   # counting tokens costs nothing
MAX_KEYS = 10_000   # agents and sessions remembered; the least recently spending are forgotten first


def today(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(ts))


class Budgets:
    def __init__(self, limits, emit: Callable[[dict], None]):
        self.limits = budgets(limits)
        self.emit = emit
        self.spent: dict[str, OrderedDict[str, float]] = {scope: OrderedDict() for scope in self.limits}
        self._announced: set[tuple[str, str, str]] = set()

    def seed(self, records) -> None:
        """Today's spend per day and session from the records earlier sidecars left in the state directory, so a
        day (or a resumed conversation) does not start afresh with each `sidecar run`."""
        day = today()
        for record in records:
            cost = record.get("cost_usd")
            if not cost or today(record.get("ts")) != day:
                continue
            if "day" in self.spent:
                self.spent["day"][day] = self.spent["day"].get(day, 0.0) + cost
            if "session" in self.spent and record.get("session"):
                table = self.spent["session"]
                table[record["session"]] = table.get(record["session"], 0.0) + cost
                if len(table) > MAX_KEYS:
                    table.popitem(last=False)

    def since(self) -> float | None:
        """Where `seed` reads from (local midnight), or None when no budget needs the past."""
        if "day" not in self.limits and "session" not in self.limits:
            return None
        now = time.localtime()
        return time.mktime((now.tm_year, now.tm_mon, now.tm_mday, 0, 0, 0, 0, 0, -1))

    def check(self, call: Call) -> None:
        """Refuse a call that would go upstream while one of its budgets is spent."""
        if not self.limits or call.route.path.endswith(FREE):
            return
        for scope, key in self._keys(call, time.time()):
            spent = self.spent[scope].get(key, 0.0)
            if spent >= self.limits[scope]:
                raise Refusal("budget", f"sidecar: the {_name(scope, key)} is spent: ${spent:.4f} of "
                                        f"${self.limits[scope]:g}; raise [limits] budget_usd \"{scope}=...\" "
                                        f"(config.toml or SIDECAR_LIMITS_BUDGET_USD) to go on; cached answers "
                                        f"are still served")

    def add(self, call: Call, cost: float | None) -> None:
        """A call's cost, counted against each of its budgets; the 80 % and 100 % events when it crosses them."""
        if not self.limits or not cost:
            return
        for scope, key in self._keys(call, call.wall_received):
            table = self.spent[scope]
            spent = table[key] = table.get(key, 0.0) + cost
            table.move_to_end(key)
            if len(table) > MAX_KEYS:
                table.popitem(last=False)
            limit = self.limits[scope]
            for level, kind in ((1.0, "budget_exceeded"), (WARN_AT, "budget_warning")):
                if spent >= limit * level:
                    if (scope, key, kind) not in self._announced:
                        if len(self._announced) > 4 * MAX_KEYS:   # bounded: at worst an event said twice
                            self._announced.clear()
                        self._announced.add((scope, key, kind))
                        self.emit(make_event(kind, "raised", budget=_name(scope, key), spent_usd=round(spent, 6),
                                             budget_usd=limit, setting=f"[limits] budget_usd \"{scope}=...\""))
                    break

    def _keys(self, call: Call, when: float) -> list[tuple[str, str]]:
        keys = []
        for scope in self.limits:
            if scope == "session":
                if not call.session and Sessions.applies(call):
                    call.session = session_id(call.route.agent, call.json, call.headers)
                if not call.session:
                    continue
            keys.append((scope, {"total": "", "day": today(when), "agent": call.route.agent,
                                 "session": call.session}[scope]))
        return keys


def _name(scope: str, key: str) -> str:
    return "total budget" if scope == "total" else f"{scope} budget of {key}"

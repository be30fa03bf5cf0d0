"""CPython's cyclic garbage collector, kept from stalling the event loop.

A collection stops the loop for a time in proportion to the objects it
traverses: a full one over what start-up leaves (modules, the price table:
about 70,000 objects) took 25-40 ms here, in the middle of the agents' streams.
Two things keep collections short. A finished call leaves no reference cycle
(its objects, its 4 MB body among them, go by reference counting the moment it
ends: capture.py keeps no reference to its call). And once start-up is over
(the price table loaded), its objects are frozen (`gc.freeze`): no collection
traverses them again; they live as long as the process anyway. The pauses are
measured (`gc.callbacks`) and shown in the overview under "collector".
"""

from __future__ import annotations

import gc
import time


class Collector:
    """The collector's pauses, by generation (collections and the longest, ms), and the freeze."""

    def __init__(self):
        self.collections = [0, 0, 0]
        self.longest_ms = [0.0, 0.0, 0.0]
        self.frozen = 0   # objects frozen, counted once at the freeze (gc.get_freeze_count walks them all)
        self._began = 0.0

    def watch(self) -> None:
        gc.callbacks.append(self._observe)

    def unwatch(self) -> None:
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)

    def freeze(self) -> None:
        """Everything alive now is out of the collector's reach (start-up's modules and tables)."""
        gc.freeze()
        self.frozen = gc.get_freeze_count()

    def _observe(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        generation = info["generation"]
        ms = (time.perf_counter() - self._began) * 1000
        self.collections[generation] += 1
        if ms > self.longest_ms[generation]:
            self.longest_ms[generation] = ms

    def snapshot(self) -> dict:
        return {"frozen": self.frozen, "collections": list(self.collections),
                "longest_ms": [round(ms, 2) for ms in self.longest_ms]}

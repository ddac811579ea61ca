"""One thread that runs callbacks at their time: many timers, one thread.

``threading.Timer`` starts an OS thread per timer. The client arms one per request (its
local deadline), and starting that thread cost about 300 µs of a 5 ms round trip on a
2-core machine (bench/path_profile.py), and a thread per request in flight under load.
``Alarms`` keeps the timers in a heap and sleeps until the next one is due.

    alarms = Alarms("client-deadlines")
    alarm = alarms.after(0.5, expire, correlation)
    alarm.cancel()      # it will not run (if it has not yet)
    alarms.stop()

Callbacks run on the alarms' thread, one at a time: they must be quick. One that raises
is logged and the others still run.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("skyhop.alarms")


class Alarm:
    __slots__ = ("args", "at", "cancelled", "fn")

    def __init__(self, at: float, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.at, self.fn, self.args, self.cancelled = at, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True  # left in the heap, skipped when it comes up


class Alarms:
    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, Alarm]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def after(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> Alarm:
        alarm = Alarm(time.monotonic() + delay_s, fn, args)
        with self._cond:
            earliest = not self._heap or alarm.at < self._heap[0][0]
            heapq.heappush(self._heap, (alarm.at, next(self._seq), alarm))
            if earliest:  # the thread sleeps until the old first one: wake it
                self._cond.notify()
        return alarm

    def stop(self) -> None:
        """No alarm runs after this returns (one running now finishes first)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _next_due(self) -> Alarm | None:
        with self._cond:
            while not self._stopped:
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                alarm = heapq.heappop(self._heap)[2]
                if not alarm.cancelled:
                    return alarm
            return None

    def _loop(self) -> None:
        while (alarm := self._next_due()) is not None:
            try:
                alarm.fn(*alarm.args)
            except Exception:  # one bad callback must not end everyone's timers
                log.exception("alarm %s failed", getattr(alarm.fn, "__name__", alarm.fn))

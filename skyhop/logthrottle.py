"""At most one log line per key per period, so bad input cannot flood the log. Pure.

    lines = LogThrottle(every_ms=60_000)
    held = lines.admit("load", now_ms)       # None: stay quiet (the counter still counts)
    if held is not None:
        log.warning("dropped a bad load report: %s%s", exc, LogThrottle.suffix(held))

The first occurrence of a key is always logged; after that one line per ``every_ms``,
which says how many were held back since the last. Counters, not log lines, are the
record of how many there were.
"""

from __future__ import annotations


class LogThrottle:
    def __init__(self, every_ms: float = 60_000.0) -> None:
        self.every_ms = every_ms
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, held since)

    def admit(self, key: str, now_ms: float) -> int | None:
        """The number held back since the last line if this one may be logged, else None."""
        last = self._last.get(key)
        if last is not None and now_ms - last[0] < self.every_ms:
            self._last[key] = (last[0], last[1] + 1)
            return None
        self._last[key] = (now_ms, 0)
        return last[1] if last is not None else 0

    @staticmethod
    def suffix(held: int) -> str:
        return f" ({held} more like it since the last line)" if held else ""

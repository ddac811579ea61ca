"""The simulated cloud GPU pool: workers that boot (cold start), serve, and retire.

A worker is paid for from the moment it is asked for until it has stopped: booting,
serving, and finishing the jobs it was running when told to retire. ``gpu_ms`` is that
integral; ``cold_starts`` the boot times since the last autoscaler call (what a real
backend measures and the autoscaler learns from).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from sim.nodes import SimNode
from sim.scenario import Cloud


class Pool:
    def __init__(self, spec: Cloud, make_node: Callable[[str], SimNode],
                 rng: random.Random) -> None:
        self.spec, self.make_node, self.rng = spec, make_node, rng
        self.booting: dict[str, tuple[SimNode, float]] = {}  # name -> (node, asked at)
        self.ready: dict[str, SimNode] = {}
        self.retiring: dict[str, SimNode] = {}
        self.cold_starts: list[float] = []
        self.gpu_ms = 0.0
        self.peak = 0
        self._count = 0
        self._since = 0.0

    @property
    def size(self) -> int:
        """Workers asked for and not told to retire: what the autoscaler controls."""
        return len(self.booting) + len(self.ready)

    @property
    def paid(self) -> int:
        return len(self.booting) + len(self.ready) + len(self.retiring)

    def account(self, now: float) -> None:
        """Charge the workers held since the last change; call before every change."""
        self.gpu_ms += self.paid * (now - self._since)
        self._since = now

    def boot_ms(self) -> float:
        """A cold start: lognormal around the scenario's mean."""
        mean, cv = self.spec.cold_start_s * 1000, self.spec.cold_start_cv
        if cv <= 0 or mean <= 0:
            return mean
        sigma = math.sqrt(math.log(1 + cv * cv))
        return mean * math.exp(self.rng.gauss(-sigma * sigma / 2, sigma))

    def ask(self, now: float) -> tuple[SimNode, float]:
        """A new worker; returns it and the time it will be ready."""
        self.account(now)
        self._count += 1
        node = self.make_node(f"cloud-{self._count}")
        self.booting[node.name] = (node, now)
        self.peak = max(self.peak, self.size)
        return node, now + self.boot_ms()

    def became_ready(self, name: str, now: float) -> SimNode | None:
        entry = self.booting.pop(name, None)
        if entry is None:
            return None  # cancelled while booting
        node, asked = entry
        self.cold_starts.append(now - asked)
        self.ready[name] = node
        return node

    def shrink(self, n: int, now: float) -> list[SimNode]:
        """Retire ``n`` workers: booting ones first, then the least busy. Returns the ready
        ones retired (the caller tells the broker they are gone)."""
        self.account(now)
        for name in list(self.booting)[::-1][:n]:  # the newest boot ends first
            del self.booting[name]
            n -= 1
        victims = sorted(self.ready.values(), key=lambda w: (w.ongoing, w.name))[:max(0, n)]
        for node in victims:
            del self.ready[node.name]
            node.retiring = True
            self.retiring[node.name] = node
        return victims

    def stopped(self, name: str, now: float) -> None:
        """A retired worker finished its last job and is gone."""
        self.account(now)
        self.retiring.pop(name, None)

    def take_cold_starts(self) -> tuple[float, ...]:
        out, self.cold_starts = tuple(self.cold_starts), []
        return out

    def ongoing(self) -> int:
        return sum(w.ongoing for w in self.ready.values())

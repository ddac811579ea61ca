"""Shared fixtures: a private Mosquitto, unique topics per test, and self-cleaning buses."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from skyhop.dev.mosquitto import MosquittoProcess, find_mosquitto
from skyhop.errors import ConfigError
from skyhop.mqtt.bus import Bus
from skyhop.protocol.topics import Topics


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoProcess]:
    """One broker for the session, from deploy/mosquitto/dev.conf on a free port.

    Never the system broker on 1883: tests must not see, or leave, anyone else's messages.
    """
    try:
        find_mosquitto()
    except ConfigError as exc:
        if os.environ.get("CI"):  # CI must prove the integration path, never skip it
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    broker = MosquittoProcess.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def topics() -> Topics:
    """Topics under a prefix unique to this test, so tests sharing a broker never collide
    (and retained messages left by one are invisible to the next)."""
    return Topics(prefix=f"test-{uuid.uuid4().hex[:12]}/v1/")


@pytest.fixture
def bus_factory(mosquitto: MosquittoProcess) -> Iterator[Callable[..., Bus]]:
    """``bus_factory(client_id=None, *, url=None, start=True, timeout=10.0, **bus_kwargs)``
    makes a Bus (on the session broker unless ``url``), starts it, and stops every bus
    it made at teardown."""
    made: list[Bus] = []

    def make(
        client_id: str | None = None,
        *,
        url: str | None = None,
        start: bool = True,
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> Bus:
        bus = Bus(url or mosquitto.url, client_id or f"test-{uuid.uuid4().hex[:10]}", **kwargs)
        made.append(bus)
        if start:
            bus.start(timeout)
        return bus

    yield make
    for bus in made:
        bus.stop()

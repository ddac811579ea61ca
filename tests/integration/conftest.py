"""Integration fixtures: every fleet test runs over plain MQTT and over mutual TLS.

``fleet_server(home)`` gives the MQTT URL to use for a fleet home: the session's plain
Mosquitto, or — for ``mqtts`` — a private Mosquitto with the home's CA, CRL and a
rendered ACL (the real deployment config), identities issued up front.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from skyhop.dev.mosquitto import MosquittoProcess, TlsMosquitto
from skyhop.home import Home
from skyhop.security.pki import Pki

# Names the tests connect as; agents are issued by LocalStack as they start.
IDENTITIES = {
    "broker": "broker",
    "monitor": "operator",
    "operator": "operator",
    "client": "client",
    "client-1": "client",
    "raw-requester": "client",
}


@pytest.fixture(scope="module", params=["mqtt", "mqtts"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def fleet_server(transport: str, mosquitto: MosquittoProcess) -> Callable[..., Any]:
    @contextmanager
    def serve(
        home: Home, agents: dict[str, str] | None = None
    ) -> Iterator[tuple[str, TlsMosquitto | None]]:
        if transport == "mqtt":
            yield mosquitto.url, None
            return
        pki = Pki(home.path)
        if not pki.ca_path.exists():
            pki.init()
        for name, role in {**IDENTITIES, **(agents or {})}.items():
            if not pki.cert_path(name).exists():
                pki.issue(name, role)
        with TlsMosquitto.start(home.path, prefix=home.config().prefix) as server:
            yield server.url, server

    return serve

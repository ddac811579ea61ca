"""Fleet key rotation: new and (during grace) old keys work, the old one is refused
with KEY_RETIRED after grace, and clients follow only CA-signed announcements."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from skyhop.client import Client
from skyhop.dev.localstack import LocalStack
from skyhop.errors import ErrorCode, RemoteError
from skyhop.mqtt.bus import Bus
from skyhop.protocol import announcement
from skyhop.protocol.envelope import FleetKeyPair
from skyhop.protocol.topics import Topics
from skyhop.security.pki import Pki
from tests.integration.fleet import make_home

pytestmark = pytest.mark.integration
IMAGE = {"image": np.zeros((1, 64), np.float32)}
GRACE_S = 4.0


@pytest.fixture
def stack(fleet_server, tmp_path) -> Iterator[LocalStack]:
    home = make_home(tmp_path)
    Pki(home.path).init()  # the CA signs key announcements, over mqtt and mqtts alike
    agents = {"edge-1": "edge", "client-2": "client"}
    with (
        fleet_server(home, agents) as (url, server),
        LocalStack(home, url, tmp_path / "logs", server) as st,
    ):
        st.broker()
        st.agent("edge-1", ["digits"])
        st.wait_live(["edge-1"])
        yield st


def _client(stack: LocalStack, name: str, key=None) -> Client:
    home = stack.home
    return Client(
        stack.mqtt_url,
        key or home.fleet_public(),
        client_id=name,
        tls=home.tls(stack.mqtt_url, name),
        topics=Topics(home.config().prefix),
        trust=home.trust(),
    )


def _eventually_ok(client: Client, timeout: float = 8.0) -> None:
    """Agents re-read their keys every 2 s: retry UNKNOWN_KEY until then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.infer("digits", IMAGE, budget_ms=2000)
            return
        except RemoteError as exc:
            if exc.code != ErrorCode.UNKNOWN_KEY or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _announce(stack: LocalStack, ann: announcement.KeyAnnouncement) -> None:
    with Bus(stack.mqtt_url, "operator", tls=stack.home.tls(stack.mqtt_url, "operator")) as bus:
        bus.publish(Topics(stack.home.config().prefix).keys, ann.encode(), retain=True)


def _ca_key(stack: LocalStack) -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(
        (stack.home.path / "pki" / "ca.key").read_bytes(), None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def test_rotation_with_grace_and_announcements(stack: LocalStack) -> None:
    home = stack.home
    old = home.fleet_public()
    with _client(stack, "client-1") as follower, _client(stack, "client-2", old) as pinned:
        pinned.trust = None  # keeps sealing to the old key whatever is announced
        _eventually_ok(follower)
        new = home.rotate(grace_s=GRACE_S, now_s=time.time())
        rotated_at = time.monotonic()
        _announce(stack, announcement.sign(new, _ca_key(stack), time.time_ns() // 1_000_000))
        deadline = time.monotonic() + 5
        while follower.fleet_key.kid != new.kid:
            assert time.monotonic() < deadline, "client did not follow the announcement"
            time.sleep(0.05)
        _eventually_ok(follower)  # sealed to the new key
        pinned.infer("digits", IMAGE, budget_ms=2000)  # old key, inside the grace period
        assert time.monotonic() - rotated_at < GRACE_S, "test too slow to check the grace"
        time.sleep(max(0.0, GRACE_S - (time.monotonic() - rotated_at)) + 2.5)  # + a refresh
        with pytest.raises(RemoteError) as info:
            pinned.infer("digits", IMAGE, budget_ms=2000)
        assert info.value.code == ErrorCode.KEY_RETIRED
        follower.infer("digits", IMAGE, budget_ms=2000)


def test_forged_and_stale_announcements_are_ignored(stack: LocalStack) -> None:
    home = stack.home
    with _client(stack, "client-1") as client:
        current = client.fleet_key.kid
        mallory = FleetKeyPair.generate().public
        forged = announcement.sign(
            mallory, ec.generate_private_key(ec.SECP256R1()), time.time_ns() // 1_000_000
        )
        _announce(stack, forged)
        time.sleep(0.5)
        assert client.fleet_key.kid == current
        assert client.counters["bad_key_announcements"] == 1
        good = announcement.sign(home.fleet_public(), _ca_key(stack), 2_000)
        _announce(stack, good)
        time.sleep(0.3)
        older = announcement.sign(mallory, _ca_key(stack), 1_000)  # genuine but older
        _announce(stack, older)
        time.sleep(0.5)
        assert client.fleet_key.kid == current
        assert client.counters["stale_key_announcements"] == 1
        _eventually_ok(client)

"""Edge sites: a site's own Mosquitto bridged to the cloud one (skyhop.security.bridge),
through the user-space WAN proxy (skyhop.dev.netem: no kernel netem here), over plain
MQTT and over mutual TLS with the rights a site's identity is given at the cloud."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from skyhop.cli import main
from skyhop.client import Client
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import MosquittoProcess, TlsMosquitto, free_port
from skyhop.dev.netem import DelayProxy
from skyhop.home import Home
from skyhop.mqtt.bus import Bus
from skyhop.protocol.topics import Topics
from skyhop.security.bridge import Bridge
from skyhop.security.pki import Pki
from tests.integration.conftest import IDENTITIES
from tests.integration.fleet import ends, make_home
from tests.integration.test_e2e import metric

pytestmark = pytest.mark.integration

IMAGE = {"image": np.zeros((1, 64), np.float32)}
WAN_MS = 20  # one way, site to cloud
BUDGET_MS = 1_500


def _live(stack: LocalStack) -> set[str]:
    return {n["node"] for n in (stack.watcher().latest or {}).get("nodes", []) if n["live"]}


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.05)


@pytest.fixture
def plain_site(mosquitto: MosquittoProcess, tmp_path: Path
               ) -> Iterator[tuple[LocalStack, Client, DelayProxy, int]]:
    """The broker and a client at the cloud Mosquitto; agent ``edge-a`` at site-a's,
    bridged through a 20 ms WAN proxy. The agent's metrics port comes last."""
    home = make_home(tmp_path)
    topics = Topics(home.config().prefix)
    with DelayProxy("127.0.0.1", mosquitto.port, delay_ms=WAN_MS) as wan:
        site = MosquittoProcess.start_site(
            Bridge("site-a", "127.0.0.1", wan.port, ("edge-a",), topics), tmp_path / "site")
        with site, LocalStack(home, mosquitto.url, tmp_path / "logs") as stack:
            stack.broker()
            port = free_port()
            stack.agent("edge-a", ["digits"], "--metrics-port", str(port), mqtt_url=site.url)
            stack.wait_live(["edge-a"])
            with Client(mosquitto.url, home.fleet_public(), topics=topics,
                        client_id="client-1") as client:
                yield stack, client, wan, port


def test_a_cut_wan_link_ends_every_request_once_and_runs_none_stale(plain_site) -> None:
    """Requests in flight when the link is cut each end DEADLINE_EXCEEDED from the
    broker; once the broker counts the silent site lost, new ones are told UNAVAILABLE
    at once; the work held in the link reaches the agent late and is dropped stale
    (skyhop.protocol.age); the restored site serves again."""
    stack, client, wan, port = plain_site
    assert wan.connections == 1  # one bridge connection carries the site
    # No work yet: the broker's clock message at the agent's birth is what lets it see
    # that the very first work it gets waited in the link (protocol.md §6.6.3).
    ran = metric(stack, 'skyhop_agent_replies_total{code="OK"}', port)
    wan.cut()
    try:
        in_flight = [client.submit("digits", IMAGE, budget_ms=BUDGET_MS) for _ in range(10)]
        assert ends(in_flight) == {"DEADLINE_EXCEEDED": 10}
        # node_timeout_s is 5 s: the broker judges the site by its load reports
        _wait(lambda: "edge-a" not in _live(stack), 30, "the silent site was lost")
        refused = [client.submit("digits", IMAGE, budget_ms=BUDGET_MS) for _ in range(5)]
        assert ends(refused) == {"UNAVAILABLE": 5}
    finally:
        wan.restore()
    _wait(lambda: metric(stack, "skyhop_agent_stale_total", port) >= 10, 30,
          "the agent dropped the held work as stale")
    assert metric(stack, 'skyhop_agent_replies_total{code="OK"}', port) == ran  # none ran
    _wait(lambda: "edge-a" in _live(stack), 30, "the site came back")
    assert client.infer("digits", IMAGE, budget_ms=5_000).header.node == "edge-a"
    time.sleep(0.5)  # a second reply to any of them would have arrived by now
    assert client.counters["unmatched_replies"] == 0


def test_a_site_bridges_over_mutual_tls_with_its_own_agents_rights_only(tmp_path) -> None:
    """The cloud's Mosquitto sees the bridge as identity site-a, which may act for the
    agents issued with --site site-a and for no other node."""
    home = make_home(tmp_path)
    prefix = home.config().prefix
    topics = Topics(prefix)
    pki = Pki(home.path)
    pki.init()
    for name, role in IDENTITIES.items():
        pki.issue(name, role)
    pki.issue("site-a", "site")
    pki.issue("edge-a", "edge", site="site-a")
    pki.issue("edge-z", "edge")  # not at the site
    with TlsMosquitto.start(home.path, prefix=prefix) as cloud:
        _check_site_rights(home, cloud.url, topics)  # before the bridge logs in as site-a
        with (
            DelayProxy("127.0.0.1", cloud.process.port, delay_ms=WAN_MS) as wan,
            _site_mosquitto(home, tmp_path, f"mqtts://127.0.0.1:{wan.port}") as site,
            LocalStack(home, cloud.url, tmp_path / "logs", cloud) as stack,
        ):
            stack.broker()
            stack.agent("edge-a", ["digits"], mqtt_url=f"mqtts://127.0.0.1:{site.port}")
            stack.wait_live(["edge-a"])
            with Client(cloud.url, home.fleet_public(), topics=topics, client_id="client-1",
                        tls=home.tls(cloud.url, "client-1")) as client:
                assert client.infer("digits", IMAGE, budget_ms=5_000).header.node == "edge-a"
            assert wan.connections == 1  # the agent's work crossed the bridge


@contextmanager
def _site_mosquitto(home: Home, tmp_path: Path, cloud_url: str) -> Iterator[MosquittoProcess]:
    """site-a's Mosquitto, from the config `skyhop mosquitto-config --site --bridge-to`
    writes, in files Mosquitto can read once it drops to its user (not pytest's tree)."""
    files = Path(tempfile.mkdtemp(prefix="skyhop-site-files-"))
    files.chmod(0o755)
    port, conf = free_port(), tmp_path / "site.conf"
    main(["mosquitto-config", "--home", str(home.path), "--port", str(port),
          "--files-dir", str(files / "tls"), "--out", str(conf),
          "--site", "site-a", "--bridge-to", cloud_url])
    assert "topic " + Topics(home.config().prefix).work("edge-a") + " in 1" in conf.read_text()
    try:
        with MosquittoProcess.start(conf, port=port, workdir=files / "run") as site:
            yield site
    finally:
        shutil.rmtree(files, ignore_errors=True)


def _check_site_rights(home: Home, url: str, topics: Topics) -> None:
    """As site-a at the cloud: its agent's load is taken, another node's is dropped."""
    import queue

    seen: queue.Queue[tuple[str, bytes]] = queue.Queue()
    with (
        Bus(url, "monitor", tls=home.tls(url, "monitor")) as monitor,
        Bus(url, "site-a", tls=home.tls(url, "site-a")) as site,
    ):
        monitor.subscribe(topics.load_all, lambda m: seen.put((m.topic, m.payload)))
        for node in ("edge-z", "edge-a"):  # the server drops the first: PUBACK 0x87
            site.publish(topics.load(node), node.encode(), qos=1)
        assert seen.get(timeout=10) == (topics.load("edge-a"), b"edge-a")
        time.sleep(0.5)  # edge-z's, had it been let through, was sent first
        assert seen.empty()

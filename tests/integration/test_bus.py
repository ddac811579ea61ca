"""skyhop.mqtt.Bus and skyhop.dev.netem.DelayProxy against a real Mosquitto."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from skyhop.dev.mosquitto import DEV_CONF, MosquittoProcess, free_port
from skyhop.dev.netem import DelayProxy
from skyhop.errors import ConfigError, TransportError
from skyhop.mqtt.bus import Bus
from skyhop.mqtt.message import Message, Will
from skyhop.mqtt.url import TlsFiles
from skyhop.protocol.topics import Topics

pytestmark = pytest.mark.integration

BusFactory = Callable[..., Bus]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.01)


def inbox() -> tuple[queue.Queue[Message], Callable[[Message], None]]:
    q: queue.Queue[Message] = queue.Queue()
    return q, q.put


def nothing_more(q: queue.Queue[Message], wait: float = 0.3) -> bool:
    try:
        q.get(timeout=wait)
    except queue.Empty:
        return True
    return False


def dev_conf_with(tmp_path: Path, **replace: str) -> Path:
    """dev.conf with whole lines replaced ({"allow_anonymous": "allow_anonymous false"})."""
    lines = []
    for line in DEV_CONF.read_text().splitlines():
        key = line.split(" ", 1)[0]
        lines.append(replace.pop(key) if key in replace else line)
    assert not replace, f"no such lines in dev.conf: {replace}"
    path = tmp_path / "variant.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- messaging


def test_request_reply_preserves_properties(bus_factory: BusFactory, topics: Topics) -> None:
    requests, on_request = inbox()
    replies, on_reply = inbox()
    worker = bus_factory("worker")
    client = bus_factory("client")

    def serve(msg: Message) -> None:
        on_request(msg)
        assert msg.response_topic is not None
        worker.publish(msg.response_topic, msg.payload[::-1], correlation=msg.correlation)

    worker.subscribe(topics.req("digits"), serve)
    client.subscribe(topics.reply("client"), on_reply)
    client.publish(
        topics.req("digits"),
        b"\x00hello\xff",
        response_topic=topics.reply("client"),
        correlation=b"\x01\x02id-7",
        user_properties=[("trace", "abc"), ("trace", "def"), ("k", "v")],
        expiry_s=30,
    )
    req = requests.get(timeout=5)
    assert req.topic == topics.req("digits")
    assert req.payload == b"\x00hello\xff"
    assert req.qos == 1
    assert req.retain is False
    assert req.response_topic == topics.reply("client")
    assert req.correlation == b"\x01\x02id-7"
    # order and duplicates of user properties survive (MQTT 5 allows both)
    assert req.user_properties == (("trace", "abc"), ("trace", "def"), ("k", "v"))
    assert req.expiry_s is not None and 0 < req.expiry_s <= 30

    rep = replies.get(timeout=5)
    assert rep.payload == b"\xffolleh\x00"
    assert rep.correlation == b"\x01\x02id-7"
    assert rep.response_topic is None and rep.user_properties == () and rep.expiry_s is None
    assert client.counters["messages_out"] == 1 and client.counters["messages_in"] == 1
    assert worker.counters["messages_in"] == 1 and worker.counters["handler_errors"] == 0


def test_handler_error_does_not_kill_the_loop(
    bus_factory: BusFactory, topics: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    got, put = inbox()

    def handler(msg: Message) -> None:
        if msg.payload == b"boom":
            raise RuntimeError("handler bug")
        put(msg)

    bus = bus_factory()
    topic = topics.load("n1")
    bus.subscribe(topic, handler)
    with caplog.at_level("ERROR", logger="skyhop.mqtt"):
        bus.publish(topic, b"boom")
        bus.publish(topic, b"after")
        assert got.get(timeout=5).payload == b"after"
    assert bus.counters["handler_errors"] == 1
    assert bus.connected
    assert any("handler bug" in (r.exc_text or "") for r in caplog.records)


def test_overlapping_subscriptions_each_run_once(bus_factory: BusFactory, topics: Topics) -> None:
    # Mosquitto sends one copy per matching subscription; dispatch must not multiply them.
    exact, on_exact = inbox()
    wild, on_wild = inbox()
    bus = bus_factory()
    bus.subscribe(topics.status("n1"), on_exact)
    bus.subscribe(topics.status_all, on_wild)
    bus.publish(topics.status("n1"), b"up")
    assert exact.get(timeout=5).payload == b"up"
    assert wild.get(timeout=5).payload == b"up"
    assert nothing_more(exact) and nothing_more(wild, 0.01)


def test_shared_subscription_delivers_each_message_once(
    bus_factory: BusFactory, topics: Topics
) -> None:
    seen: queue.Queue[tuple[str, bytes]] = queue.Queue()
    for name in ("broker-a", "broker-b"):
        b = bus_factory(name)
        b.subscribe(topics.req_shared("brokers"), lambda m, n=name: seen.put((n, m.payload)))
    client = bus_factory()
    sent = [f"r{i}".encode() for i in range(20)]
    for payload in sent:
        client.publish(topics.req("digits"), payload)
    got = [seen.get(timeout=5) for _ in sent]
    assert sorted(p for _, p in got) == sorted(sent)
    assert nothing_more(seen)  # exactly once across the group
    assert {n for n, _ in got} <= {"broker-a", "broker-b"}


def test_retained_message_and_unsubscribe(bus_factory: BusFactory, topics: Topics) -> None:
    pub = bus_factory()
    pub.publish(topics.sla("digits"), b"50ms", retain=True)
    # Retained by the server before anyone subscribes: else it could arrive live.
    assert pub.flush(10)
    got, put = inbox()
    sub = bus_factory()
    sub.subscribe(topics.sla_all, put)
    msg = got.get(timeout=5)
    assert (msg.payload, msg.retain) == (b"50ms", True)
    sub.unsubscribe(topics.sla_all)
    time.sleep(0.2)  # the UNSUBSCRIBE is not awaited
    pub.publish(topics.sla("digits"), b"60ms", retain=True)
    assert nothing_more(got)


# --------------------------------------------------------------------------- will


def test_abort_sends_the_will_retained(bus_factory: BusFactory, topics: Topics) -> None:
    live, on_live = inbox()
    watcher = bus_factory("watcher")
    watcher.subscribe(topics.status_all, on_live)
    agent = bus_factory(
        "cam-7",
        will=Will(topics.status("cam-7"), b"offline"),
        on_connect=lambda: agent.publish(topics.status("cam-7"), b"online", retain=True),
        start=False,  # the hook needs `agent` bound before the first CONNACK
    )
    agent.start()
    assert live.get(timeout=5).payload == b"online"
    agent.abort()
    assert not agent.connected
    will = live.get(timeout=5)
    assert (will.topic, will.payload) == (topics.status("cam-7"), b"offline")
    # A late subscriber gets the will as the retained status.
    late, on_late = inbox()
    bus_factory("late").subscribe(topics.status_all, on_late)
    retained = late.get(timeout=5)
    assert (retained.payload, retained.retain) == (b"offline", True)
    with pytest.raises(TransportError, match="stopped"):
        agent.publish(topics.status("cam-7"), b"x")


def test_stop_does_not_send_the_will(bus_factory: BusFactory, topics: Topics) -> None:
    live, on_live = inbox()
    watcher = bus_factory("watcher")
    watcher.subscribe(topics.status_all, on_live)
    agent = bus_factory("cam-8", will=Will(topics.status("cam-8"), b"offline"))
    agent.stop()
    agent.stop()  # idempotent
    time.sleep(0.3)
    # A marker sent after the disconnect: if the will had been sent, it would come first.
    watcher.publish(topics.status("cam-8"), b"marker")
    assert live.get(timeout=5).payload == b"marker"
    with pytest.raises(TransportError, match="stopped"):
        agent.publish(topics.status("cam-8"), b"x")
    with pytest.raises(TransportError, match="make a new Bus"):
        agent.start()


# --------------------------------------------------------------------------- reconnects


def test_resubscribes_and_reruns_hook_after_broker_restart(topics: Topics) -> None:
    births = []
    with MosquittoProcess.start() as broker:
        got, put = inbox()
        sub = Bus(broker.url, "sub", on_connect=lambda: births.append(time.monotonic()))
        sub.subscribe(topics.work("n1"), put)  # before start: made on connect
        pub = Bus(broker.url, "pub")
        with sub.start(), pub.start():
            pub.publish(topics.work("n1"), b"before")
            assert got.get(timeout=5).payload == b"before"
            assert len(births) == 1

            broker.restart()  # persistence false: the new broker knows no subscriptions
            wait_until(lambda: sub.connected and pub.connected, what="both reconnected")
            wait_until(lambda: len(births) == 2, what="on_connect hook rerun")
            assert sub.counters["reconnects"] == 1
            # The SUBSCRIBE is sent on reconnect but not awaited: retry until it lands.
            deadline = time.monotonic() + 10
            while True:
                pub.publish(topics.work("n1"), b"after")
                try:
                    assert got.get(timeout=0.2).payload == b"after"
                    break
                except queue.Empty:
                    assert time.monotonic() < deadline, "subscription lost after restart"


def test_qos1_published_while_disconnected_is_sent_after_reconnect(topics: Topics) -> None:
    with MosquittoProcess.start() as broker:
        got, put = inbox()
        # One bus both ways: paho resends held messages after on_connect has queued the
        # re-SUBSCRIBE, so the broker sees the subscription first and delivery is certain.
        bus = Bus(broker.url, "pubsub")
        bus.subscribe(topics.work("n1"), put)
        with bus.start():
            broker._terminate()  # down, and it stays down while we publish
            wait_until(lambda: not bus.connected, what="the bus notices the broker is gone")
            bus.publish(topics.work("n1"), b"held")  # QoS 1: held by the client
            bus.publish(topics.work("n1"), b"dropped", qos=0)  # QoS 0: dropped
            assert bus.counters["dropped"] == 1
            broker._launch(10.0)  # same port, same config
            assert got.get(timeout=10).payload == b"held"
            assert nothing_more(got)
            assert bus.counters["reconnects"] == 1


# --------------------------------------------------------------------------- start errors


def test_start_times_out_with_transport_error() -> None:
    bus = Bus(f"mqtt://127.0.0.1:{free_port()}", "nobody-home")
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="cannot connect"):
        bus.start(timeout=1.0)
    assert time.monotonic() - t0 < 5
    with pytest.raises(TransportError, match="not started"):
        bus.publish("a/b", b"x")


def test_refused_auth_is_a_config_error_without_retries(tmp_path: Path) -> None:
    conf = dev_conf_with(tmp_path, allow_anonymous="allow_anonymous false")
    with MosquittoProcess.start(conf) as broker:
        bus = Bus(broker.url, "anonymous")
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match="not authorized"):
            bus.start(timeout=10)
        assert time.monotonic() - t0 < 2  # no retrying until the timeout


def test_uses_the_server_receive_maximum(tmp_path: Path, topics: Topics) -> None:
    conf = dev_conf_with(tmp_path, max_inflight_messages="max_inflight_messages 20")
    with MosquittoProcess.start(conf) as broker, Bus(broker.url, "b") as bus:
        assert bus._client.max_inflight_messages == 20  # paho would have used 1000
        got, put = inbox()
        bus.subscribe(topics.load_all, put)
        for i in range(200):
            bus.publish(topics.load("n1"), str(i).encode())
        assert [got.get(timeout=5).payload for _ in range(200)] == [
            str(i).encode() for i in range(200)
        ]


def test_hook_may_subscribe_and_publish(bus_factory: BusFactory, topics: Topics) -> None:
    got, put = inbox()

    def hook() -> None:  # runs inside start(): must neither block nor fail
        bus.subscribe(topics.ping("self"), put)
        bus.publish(topics.ping("self"), b"hello from the hook")

    bus = bus_factory(on_connect=hook, start=False)
    t0 = time.monotonic()
    bus.start()
    assert time.monotonic() - t0 < 2
    assert got.get(timeout=5).payload == b"hello from the hook"
    assert bus.counters["handler_errors"] == 0


def test_bad_filters_and_topics(bus_factory: BusFactory) -> None:
    bus = bus_factory()
    for bad in ("a/b#", "a/+b", "a/#/c", "", "$share//a", "$share/g"):
        with pytest.raises(ValueError):
            bus.subscribe(bad, print)
    for bad in ("a/+", "a/#", ""):
        with pytest.raises(ValueError):
            bus.publish(bad, b"x")


# --------------------------------------------------------------------------- TCP_NODELAY


def test_tcp_nodelay_is_set_and_round_trips_are_quick(
    bus_factory: BusFactory, topics: Topics
) -> None:
    bus = bus_factory()
    sock = bus._client.socket()  # the only way to see the option on paho's socket
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    got, put = inbox()
    bus.subscribe(topics.ping("n1"), put)
    t0 = time.monotonic()
    for i in range(50):  # sequential: each waits for the previous echo
        bus.publish(topics.ping("n1"), i.to_bytes(2, "big"))
        assert got.get(timeout=5).payload == i.to_bytes(2, "big")
    elapsed = time.monotonic() - t0
    # Not a timing assertion (the socket option above is the check); with Nagle this
    # would take ~4 s, so print it for whoever reads -s output.
    print(f"50 sequential QoS 1 round trips: {elapsed * 1000:.1f} ms")


# --------------------------------------------------------------------------- TLS


def _make_pki(tmp_path: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        write(name, cert, key)
        return cert, key

    ca_cert, ca_key = ca("ca")
    ca("other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write("server", server, key)
    # Mosquitto drops root privileges before reading these files (test-only keys).
    for p in [tmp_path, *tmp_path.iterdir()]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return {p.stem if p.suffix == ".pem" else p.name: p for p in tmp_path.iterdir()}


TLS_CONF = """
per_listener_settings false
listener {port} 127.0.0.1
allow_anonymous true
cafile {ca}
certfile {cert}
keyfile {key}
tls_version tlsv1.3
require_certificate {require}
set_tcp_nodelay true
persistence false
log_dest stderr
log_type all
"""


@pytest.fixture
def tls_broker(request: pytest.FixtureRequest):
    # Not tmp_path: run as root, Mosquitto drops to its own user before it reads the
    # certificates, and pytest's temp tree is private to root.
    pki_dir = Path(tempfile.mkdtemp(prefix="skyhop-pki-"))
    try:
        pki = _make_pki(pki_dir)
        template = pki_dir / "tls.conf"
        template.write_text(TLS_CONF)
        params = {
            "ca": pki["ca"],
            "cert": pki["server"],
            "key": pki_dir / "server.key",
            "require": "true" if getattr(request, "param", False) else "false",
        }
        with MosquittoProcess.start(template, params=params) as broker:
            yield broker, pki
    finally:
        shutil.rmtree(pki_dir, ignore_errors=True)


def test_tls_round_trip(tls_broker, topics: Topics) -> None:
    broker, pki = tls_broker
    url = f"mqtts://127.0.0.1:{broker.port}"
    with Bus(url, "tls-client", tls=TlsFiles(pki["ca"])) as bus:
        assert bus._client.socket().version() == "TLSv1.3"
        got, put = inbox()
        bus.subscribe(topics.load_all, put)
        bus.publish(topics.load("n1"), b"over tls")
        assert got.get(timeout=5).payload == b"over tls"


def test_tls_untrusted_server_is_a_config_error(tls_broker) -> None:
    broker, pki = tls_broker
    bus = Bus(f"mqtts://127.0.0.1:{broker.port}", "c", tls=TlsFiles(pki["other-ca"]))
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="cannot verify the certificate"):
        bus.start(timeout=10)
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("tls_broker", [True], indirect=True)
def test_tls_missing_client_certificate_is_a_config_error(tls_broker) -> None:
    broker, pki = tls_broker
    bus = Bus(f"mqtts://127.0.0.1:{broker.port}", "c", tls=TlsFiles(pki["ca"]))
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="certificate"):
        bus.start(timeout=10)
    assert time.monotonic() - t0 < 2


def test_tls_files_need_mqtts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mqtts://"):
        Bus("mqtt://127.0.0.1:1", "c", tls=TlsFiles(tmp_path / "ca.pem"))


# --------------------------------------------------------------------------- DelayProxy


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(65536):
                conn.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return server, t


def _round_trip(sock: socket.socket, payload: bytes) -> float:
    t0 = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "connection closed early"
        got += chunk
    assert got == payload
    return time.monotonic() - t0


def test_delay_proxy_adds_its_delay_both_ways() -> None:
    delay_ms = 50
    server, _ = _echo_server()
    port = server.getsockname()[1]
    with DelayProxy("127.0.0.1", port, delay_ms=delay_ms) as proxy:
        with socket.create_connection(("127.0.0.1", port)) as direct:
            direct.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            direct_rtt = _round_trip(direct, b"ping")
        server2, _ = _echo_server()
        proxy2 = DelayProxy("127.0.0.1", server2.getsockname()[1], delay_ms=delay_ms)
        with proxy2, socket.create_connection(("127.0.0.1", proxy2.start())) as via:
            via.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = [_round_trip(via, b"ping%d" % i) for i in range(3)]
        assert proxy.connections == 0 and proxy2.connections == 1
    server.close()
    server2.close()
    # A lower bound only: a loaded machine may add time, never remove it.
    assert min(rtts) >= 2 * delay_ms / 1000
    assert min(rtts) > direct_rtt


def test_delay_proxy_preserves_order_and_paces_bandwidth() -> None:
    server, _ = _echo_server()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    mbps = 200.0
    with (
        DelayProxy("127.0.0.1", server.getsockname()[1], delay_ms=5, bandwidth_mbps=mbps) as p,
        socket.create_connection(("127.0.0.1", p.port)) as sock,
    ):
        got = bytearray()
        t0 = time.monotonic()

        def send() -> None:
            sock.sendall(payload)

        sender = threading.Thread(target=send)
        sender.start()
        while len(got) < len(payload):
            chunk = sock.recv(1 << 20)
            assert chunk
            got += chunk
        elapsed = time.monotonic() - t0
        sender.join()
    server.close()
    assert bytes(got) == payload
    # Each direction serialises the payload at `mbps`; the echo makes two passes that
    # overlap, so one pass plus the delays is the floor.
    assert elapsed >= len(payload) * 8 / (mbps * 1e6) + 2 * 0.005


def test_a_cut_link_holds_bytes_both_ways_until_restored() -> None:
    """A cut holds what is sent on an open connection, and a new connection's bytes,
    and delivers them in order on restore: TCP's view of a short outage."""
    server, _ = _echo_server()
    with (
        DelayProxy("127.0.0.1", server.getsockname()[1], delay_ms=0) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as sock,
    ):
        assert _round_trip(sock, b"before") >= 0
        proxy.cut()
        assert proxy.is_cut
        sock.sendall(b"during")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(100)  # nothing crosses
        proxy.restore()
        sock.settimeout(10)
        got = b""
        while len(got) < len(b"during"):
            got += sock.recv(100)
        assert got == b"during"
    server.close()


def test_bus_through_delay_proxy(mosquitto: MosquittoProcess, topics: Topics) -> None:
    delay_ms = 40
    with (
        DelayProxy("127.0.0.1", mosquitto.port, delay_ms=delay_ms) as proxy,
        Bus(proxy.url, "far-edge") as bus,
    ):
        got, put = inbox()
        bus.subscribe(topics.ping("far"), put)
        big = os.urandom(2 * 1024 * 1024)
        t0 = time.monotonic()
        bus.publish(topics.ping("far"), b"small")
        assert got.get(timeout=5).payload == b"small"
        rtt = time.monotonic() - t0
        bus.publish(topics.ping("far"), big)
        assert got.get(timeout=10).payload == big
    assert rtt >= 2 * delay_ms / 1000


def test_dev_conf_runs_as_the_readme_says() -> None:
    """`mosquitto -c deploy/mosquitto/dev.conf`, verbatim, listens on 127.0.0.1:1883.
    Run in a network namespace of its own, where 1883 is free whatever this host runs."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    script = f"ip link set lo up && timeout 3 {mosquitto} -c {DEV_CONF}"
    try:
        proc = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True,
                              text=True, timeout=30, cwd=DEV_CONF.parents[2])
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if "Operation not permitted" in proc.stderr:
        pytest.skip("unshare -n needs root (CI runs as root)")
    assert "Opening ipv4 listen socket on port 1883" in proc.stderr, proc.stderr


def test_on_unheard_runs_only_for_a_message_nobody_received(
    bus_factory: BusFactory, topics: Topics
) -> None:
    """PUBACK 0x10 (no matching subscribers) calls the publish's hook; a message that
    someone subscribed to does not, whichever thread wins the race with publish()."""
    bus = bus_factory("unheard-pub")
    listener = bus_factory("unheard-sub")
    got, put = inbox()
    listener.subscribe(topics.ping("heard"), put)
    unheard: queue.Queue[str] = queue.Queue()
    for i in range(20):
        bus.publish(topics.ping("heard"), b"x", on_unheard=lambda: unheard.put("heard"))
        bus.publish(topics.ping(f"nobody-{i}"), b"x", on_unheard=lambda: unheard.put("nobody"))
    assert bus.flush(10)
    wait_until(lambda: got.qsize() == 20, what="the heard messages")
    time.sleep(0.2)
    assert [unheard.get_nowait() for _ in range(unheard.qsize())] == ["nobody"] * 20
    assert bus.counters["publish_unrouted"] == 20

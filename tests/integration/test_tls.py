"""Transport security against a real Mosquitto: the config `skyhop mosquitto-config`
writes, started as it is (as root it drops to the mosquitto user), with certificates
from `skyhop certs`. One Mosquitto and one PKI for the whole module.

Refused at the TLS handshake: no certificate, another CA, expired, revoked, a server
certificate, TLS 1.2. Not authorised (and never delivered): every publication the ACL
does not grant, reads of another node's work or another client's replies, a Will on
another node's status, a client id that belongs to someone else.

"Never delivered" is checked without sleeping: a denied QoS 1 PUBLISH is answered
PUBACK 0x87, after which a sentinel message to the same watcher (a subscriber to
everything it may read) is published; Mosquitto delivers to one subscriber in order,
so once the sentinel arrives anything published before it would have arrived too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pwd
import queue
import shutil
import signal
import socket
import ssl
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from skyhop.cli import main
from skyhop.dev.mosquitto import MosquittoProcess, find_mosquitto, free_port
from skyhop.errors import ConfigError, TransportError
from skyhop.mqtt.bus import Bus
from skyhop.mqtt.message import Message, Will
from skyhop.mqtt.url import TlsFiles
from skyhop.protocol.topics import Topics
from skyhop.security.acl import acl_entries, desired
from skyhop.security.dynsec import apply
from skyhop.security.mosquitto_conf import (
    DEBIAN_PLUGIN,
    DEPLOY_TEMPLATE,
    TEMPLATE_HEADER,
    prepare,
    render,
    template,
)
from skyhop.security.pki import Pki, key_pem, make_ca, make_leaf, pem

pytestmark = pytest.mark.integration
T = Topics()  # the ACL is rendered for the default prefix
P = T.prefix
NOT_AUTHORIZED = 0x87

IDENTITIES = {
    # publishers and snoopers, connected only for the test that uses them
    "edge-1": "edge",
    "client-1": "client",
    "broker-1": "broker",
    "op": "operator",
    "edge-x": "edge",  # the would-be session thief
    # watchers (subscribe to everything they may read) and sentinel writers
    "edge-2": "edge",
    "client-2": "client",
    "broker-2": "broker",
    "op-2": "operator",
    "broker-3": "broker",
    "client-3": "client",
    "edge-old": "edge",  # revoked before Mosquitto starts
    "edge-late": "edge",  # revoked while it runs (last test)
}
# watcher role -> (watcher, sentinel writer, sentinel topic the watcher may read)
WATCHERS = {
    "broker": ("broker-2", "client-3", "req/sentinel"),
    "edge": ("edge-2", "broker-3", "nodes/edge-2/work"),
    "client": ("client-2", "broker-3", "reply/client-2"),
    "operator": ("op-2", "broker-3", "broker/status"),
}


@dataclass
class Fleet:
    broker: MosquittoProcess
    home: Path
    files: Path
    strays: Path  # certificates the registry does not know: expired, another CA
    port: int

    @property
    def pki(self) -> Pki:
        return Pki(self.home)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def tls(self, name: str) -> TlsFiles:
        return TlsFiles(*self.pki.credentials(name))

    def stray(self, name: str) -> TlsFiles:
        return TlsFiles(self.pki.ca_path, self.strays / f"{name}.crt", self.strays / f"{name}.key")

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads the CRL and the ACL."""
        # MosquittoProcess has no reload() yet; its child is the mosquitto process.
        os.kill(self.broker._proc.pid, signal.SIGHUP)


def _cli(*args: object) -> None:
    main([str(a) for a in args])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    try:
        find_mosquitto()
    except ConfigError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    home = tmp_path_factory.mktemp("tls-home")  # private to us, as a home should be
    # Where Mosquitto reads its files: not under pytest's tree, which the mosquitto user
    # cannot enter once Mosquitto (started as root) has dropped to it.
    files = Path(tempfile.mkdtemp(prefix="skyhop-tls-"))
    workdir = tmp_path_factory.mktemp("tls-mosquitto")
    try:
        _cli("certs", "init", "--home", home)
        pki = Pki(home)
        for name, role in IDENTITIES.items():
            pki.issue(name, role)
        _cli("certs", "revoke", "edge-old", "--home", home)
        strays = _make_strays(pki, home / "strays")
        port = free_port()
        config = workdir / "skyhop.conf"
        _cli(
            "mosquitto-config",
            "--home",
            home,
            "--port",
            port,
            "--bind",
            "127.0.0.1",
            "--files-dir",
            files,
            "--out",
            config,
        )
        with MosquittoProcess.start(config, port=port, workdir=workdir) as broker:
            yield Fleet(broker, home, files, strays, port)
    finally:
        shutil.rmtree(files, ignore_errors=True)


def _make_strays(pki: Pki, where: Path) -> Path:
    where.mkdir()
    now = dt.datetime.now(dt.timezone.utc)
    ca_cert, ca_key = pki.ca_certificate(), pki.ca_private_key()
    # A real name in the ACL, so that expiry alone is what refuses it.
    expired = make_leaf(ca_cert, ca_key, "edge-1", "edge", now=now - dt.timedelta(days=30), days=1)
    alien = make_leaf(*make_ca(now=now), "edge-1", "edge", now=now)
    for name, (cert, key) in {"expired": expired, "alien": alien}.items():
        (where / f"{name}.crt").write_bytes(pem(cert))
        (where / f"{name}.key").write_bytes(key_pem(key))
    return where


@pytest.fixture
def connect(fleet: Fleet) -> Iterator[Callable[..., Bus]]:
    """``connect(name, client_id=name, **bus_kwargs)``: a started Bus with NAME's
    certificate; every one is stopped at teardown."""
    made: list[Bus] = []

    def make(name: str, client_id: str | None = None, **kwargs: object) -> Bus:
        bus = Bus(fleet.url, client_id or name, tls=fleet.tls(name), **kwargs)
        made.append(bus)
        return bus.start(timeout=5)

    yield make
    for bus in made:
        bus.stop()


class Inbox:
    def __init__(self) -> None:
        self._q: queue.Queue[Message] = queue.Queue()

    def put(self, msg: Message) -> None:
        self._q.put(msg)

    def until(self, payload: bytes, timeout: float = 5.0) -> list[Message]:
        """Every message up to and including the first with ``payload``."""
        got: list[Message] = []
        deadline = time.monotonic() + timeout
        while not got or got[-1].payload != payload:
            got.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
        return got


def watch(bus: Bus, *filters: str) -> Inbox:
    """Subscribe ``bus`` to ``filters``, skipping those the server refuses (default:
    everything its identity may read, as skyhop.security.acl grants it)."""
    inbox = Inbox()
    for f in filters or _readable(bus.client_id):
        with contextlib.suppress(ConfigError):
            bus.subscribe(f, inbox.put)
    return inbox


def _readable(name: str) -> list[str]:
    return [e["topic"] for e in acl_entries(name, IDENTITIES[name], T)
            if e["acltype"] == "subscribePattern"]


def publish_once(
    fleet: Fleet, name: str, topic: str, payload: bytes, *, tls: TlsFiles | None = None
) -> int:
    """Connect as NAME with paho directly, publish once at QoS 1, and return the PUBACK
    reason code (skyhop's Bus does not surface it)."""
    acks: queue.Queue[int] = queue.Queue()
    up = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
    c.tls_set_context((tls or fleet.tls(name)).context())
    c.on_connect = lambda *args: up.set()
    c.on_publish = lambda client, userdata, mid, reason, props: acks.put(reason.value)
    c.connect("127.0.0.1", fleet.port)
    c.loop_start()
    try:
        assert up.wait(5), f"{name} could not connect"
        c.publish(topic, payload, qos=1)
        return acks.get(timeout=5)
    finally:
        c.disconnect()
        c.loop_stop()


def raw_connack(fleet: Fleet, ctx: ssl.SSLContext) -> bytes | Exception:
    """Send a bare MQTT 5 CONNECT over TLS; the server's first bytes, or the error."""
    connect = bytes([0x10, 14, 0, 4]) + b"MQTT" + bytes([5, 2, 0, 60, 0, 0, 1]) + b"x"
    try:
        with (
            socket.create_connection(("127.0.0.1", fleet.port), timeout=5) as sock,
            ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(connect)
            return tls.recv(64)
    except (ssl.SSLError, OSError) as exc:
        return exc


def client_context(tls: TlsFiles | None, ca: Path, *, max_tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if max_tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


# -- the config and the files ------------------------------------------------------------


def test_deploy_template_matches_the_renderer() -> None:
    assert DEPLOY_TEMPLATE.read_text() == template(), (
        "regenerate: python -c 'from skyhop.security.mosquitto_conf import template; "
        'print(template(), end="")\' > deploy/mosquitto/tls.conf'
    )
    filled = template().format(port=8883, files="/etc/mosquitto/skyhop")
    assert filled == TEMPLATE_HEADER + render("/etc/mosquitto/skyhop", 8883)


def test_config_states_every_security_setting() -> None:
    lines = set(render("/srv/f", 8883, bind="10.0.0.1", plugin=DEBIAN_PLUGIN).splitlines())
    assert {
        "listener 8883 10.0.0.1",
        "cafile /srv/f/ca.crt",
        "certfile /srv/f/server.crt",
        "keyfile /srv/f/server.key",
        "crlfile /srv/f/crl.pem",
        "plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        "plugin_opt_config_file /srv/f/dynsec/dynsec.json",
        "tls_version tlsv1.3",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        "set_tcp_nodelay true",
        "max_queued_messages 10000",
        "max_inflight_messages 1000",
        "per_listener_settings false",
        "persistence false",
        "user mosquitto",
    } <= lines
    persisted = render("/srv/f", 8883, persistence="/var/lib/skyhop-mqtt/").splitlines()
    assert "persistence true" in persisted
    assert "persistence_location /var/lib/skyhop-mqtt/" in persisted


def test_mosquitto_dropped_root_and_reads_its_files(fleet: Fleet) -> None:
    proc = fleet.broker._proc
    assert proc is not None and fleet.broker.running
    if os.geteuid() != 0:
        pytest.skip("not root: Mosquitto has no privileges to drop")
    status = Path(f"/proc/{proc.pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    mosquitto = pwd.getpwnam("mosquitto")
    assert uid == mosquitto.pw_uid  # it runs as mosquitto, and it started: it read them
    st = fleet.files.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, mosquitto.pw_gid, 0o750)
    for f in fleet.files.iterdir():
        st = f.stat()
        if f.name == "dynsec":  # the plugin rewrites its rights file: Mosquitto owns it
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (mosquitto.pw_uid, 0o700)
            continue
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, mosquitto.pw_gid, 0o640)
    rights = fleet.files / "dynsec" / "dynsec.json"
    assert (rights.stat().st_uid, stat.S_IMODE(rights.stat().st_mode)) == (mosquitto.pw_uid, 0o600)


def test_not_root_keeps_the_files_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A Mosquitto started by a normal user stays that user: nothing to hand over.
    monkeypatch.setattr("skyhop.security.mosquitto_conf.os.geteuid", lambda: 4242)
    Pki(tmp_path / "home").init()
    files = prepare(tmp_path / "home")
    assert files.dir == tmp_path / "home" / "mosquitto" and files.server == "mqtt-server"
    assert stat.S_IMODE(files.dir.stat().st_mode) == 0o700
    for f in (files.ca, files.cert, files.key, files.crl, files.rights):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600 and f.stat().st_uid == os.getuid()


def test_files_mosquitto_cannot_reach_are_refused(fleet: Fleet) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands files to the mosquitto user")
    private = Path(tempfile.mkdtemp(prefix="skyhop-private-"))  # 0700 root
    try:
        with pytest.raises(ConfigError, match=f"cannot reach .*{private} is drwx------"):
            prepare(fleet.home, files_dir=private / "mosquitto")
    finally:
        shutil.rmtree(private)


def test_prepare_resigns_a_crl_near_its_next_update(fleet: Fleet, tmp_path: Path) -> None:
    # Past nextUpdate OpenSSL refuses every client ("CRL has expired"): never let it near.
    home = tmp_path / "home"
    pki = Pki(home)
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=80)
    pki.init(now=long_ago)  # its CRL has 10 of 90 days left
    files = Path(tempfile.mkdtemp(prefix="skyhop-crl-"))
    try:
        prepare(home, files_dir=files)
        crl = x509.load_pem_x509_crl((files / "crl.pem").read_bytes())
        assert crl.next_update_utc is not None
        assert crl.next_update_utc - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=80)
        assert [e.role for e in pki.active()] == ["server"]  # mqtt-server, issued for it
    finally:
        shutil.rmtree(files)


# -- who may connect -----------------------------------------------------------------------


def test_a_fleet_certificate_connects_over_tls13(fleet: Fleet) -> None:
    reply = raw_connack(fleet, client_context(fleet.tls("edge-1"), fleet.pki.ca_path))
    assert isinstance(reply, bytes) and reply[:1] == b"\x20" and reply[3] == 0  # CONNACK, 0
    with Bus(fleet.url, "edge-1", tls=fleet.tls("edge-1")) as bus:
        assert bus._client.socket().version() == "TLSv1.3"


REFUSED = {
    # case: (certificate, what OpenSSL says)
    "no client certificate": (None, "certificate required"),
    "another CA": ("alien", "unknown ca"),
    "expired": ("expired", "certificate expired"),
    "revoked": ("edge-old", "certificate revoked"),
    "server certificate as a client": ("mqtt-server", "unsupported certificate"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_at_the_handshake(fleet: Fleet, case: str) -> None:
    which, words = REFUSED[case]
    if which is None:
        tls = TlsFiles(fleet.pki.ca_path)
    elif which in ("alien", "expired"):
        tls = fleet.stray(which)
    else:
        tls = fleet.tls(which)
    reply = raw_connack(fleet, client_context(tls if tls.cert else None, fleet.pki.ca_path))
    assert not (isinstance(reply, bytes) and reply[:1] == b"\x20"), "got a CONNACK"
    bus = Bus(fleet.url, "edge-1", tls=tls)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=words):
        bus.start(timeout=10)
    assert time.monotonic() - t0 < 2  # one clear error, not a reconnect loop


def test_clients_check_the_servers_name(fleet: Fleet) -> None:
    ctx = client_context(fleet.tls("edge-1"), fleet.pki.ca_path)
    with (
        socket.create_connection(("127.0.0.1", fleet.port), timeout=5) as sock,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        ctx.wrap_socket(sock, server_hostname="mqtt.elsewhere.example")
    with Bus(f"mqtts://localhost:{fleet.port}", "edge-1", tls=fleet.tls("edge-1")) as bus:
        assert bus.connected  # localhost and 127.0.0.1 are always in the server's SANs


def test_a_tls12_only_client_is_refused(fleet: Fleet) -> None:
    ctx = client_context(fleet.tls("edge-1"), fleet.pki.ca_path, max_tls12=True)
    reply = raw_connack(fleet, ctx)
    assert isinstance(reply, ssl.SSLError) and "protocol version" in str(reply).lower()


# -- what each identity may publish ----------------------------------------------------------

PUBLISH = [
    # (publisher, topic, watched by, allowed)
    ("edge-1", "nodes/edge-1/status", "broker", True),
    ("edge-1", "nodes/edge-1/load", "broker", True),
    ("edge-1", "nodes/edge-1/load", "operator", True),
    ("edge-1", "broker/broker-2/replies", "broker", True),
    ("edge-1", "nodes/edge-2/load", "broker", False),
    ("edge-1", "nodes/edge-2/status", "broker", False),
    ("edge-1", "nodes/edge-2/status", "operator", False),
    ("edge-1", "nodes/edge-2/work", "edge", False),
    ("edge-1", "req/digits", "broker", False),
    ("edge-1", "reply/client-2", "client", False),  # a forged clear error (protocol §9.5)
    ("edge-1", "config/sla/digits", "edge", False),
    ("edge-1", "keys/fleet", "client", False),
    ("edge-1", "broker/status", "operator", False),
    ("client-1", "req/digits", "broker", True),
    ("client-1", "reply/client-2", "client", False),
    ("client-1", "nodes/edge-2/work", "edge", False),
    ("client-1", "nodes/edge-2/status", "broker", False),
    ("client-1", "config/sla/digits", "broker", False),
    ("client-1", "keys/fleet", "client", False),
    ("client-1", "broker/broker-2/replies", "broker", False),
    ("broker-1", "nodes/edge-2/work", "edge", True),
    ("broker-1", "reply/client-2", "client", True),
    ("broker-1", "broker/status", "operator", True),
    ("broker-1", "nodes/edge-2/load", "broker", False),
    ("broker-1", "config/sla/digits", "edge", False),
    ("broker-1", "keys/fleet", "client", False),
    ("op", "config/sla/digits", "edge", True),
    ("op", "keys/fleet", "client", True),
    ("op", "req/digits", "broker", False),
    ("op", "nodes/edge-2/work", "edge", False),
    ("op", "reply/client-2", "client", False),
    ("op", "nodes/edge-2/status", "broker", False),
]


@pytest.mark.parametrize(
    ("publisher", "topic", "watcher", "allowed"),
    PUBLISH,
    ids=[f"{p}->{t}:{'ok' if a else 'denied'}" for p, t, _, a in PUBLISH],
)
def test_publish_rights(
    fleet: Fleet,
    connect: Callable[..., Bus],
    publisher: str,
    topic: str,
    watcher: str,
    allowed: bool,
) -> None:
    watcher_name, sentinel_writer, sentinel_topic = WATCHERS[watcher]
    inbox = watch(connect(watcher_name))
    writer = connect(sentinel_writer)
    payload, sentinel = uuid.uuid4().bytes, uuid.uuid4().bytes
    code = publish_once(fleet, publisher, P + topic, payload)
    assert code == (0 if allowed else NOT_AUTHORIZED)
    writer.publish(P + sentinel_topic, sentinel)
    seen = [m.payload for m in inbox.until(sentinel)]
    assert (payload in seen) is allowed


def test_a_will_on_another_nodes_status_is_never_delivered(
    fleet: Fleet, connect: Callable[..., Bus]
) -> None:
    inbox = watch(connect("broker-2"), T.status_all)
    forged = uuid.uuid4().bytes
    liar = connect("edge-1", will=Will(T.status("edge-2"), forged))
    liar.abort()  # the server now publishes the will, if the ACL lets it
    honest = connect("edge-1")  # after the will: Mosquitto handles them in order
    sentinel = uuid.uuid4().bytes
    honest.publish(T.status("edge-1"), sentinel)
    assert forged not in [m.payload for m in inbox.until(sentinel)]


# -- what each identity may read -----------------------------------------------------------


def test_an_agent_never_sees_another_agents_work(connect: Callable[..., Bus]) -> None:
    snoop = watch(
        connect("edge-1"),
        "#",
        P + "nodes/+/work",
        T.work("edge-2"),
        f"$share/snoop/{T.work('edge-2')}",
        P + "nodes/edge-2/req/#",
        T.work("edge-1"),  # its own: where the sentinel comes (the rest is refused)
    )
    owner = watch(connect("edge-2"), T.work("edge-2"))
    broker = connect("broker-3")
    secret, sentinel = uuid.uuid4().bytes, uuid.uuid4().bytes
    broker.publish(T.work("edge-2"), secret)
    broker.publish(T.node_req("edge-2", "digits"), secret)
    broker.publish(T.work("edge-1"), sentinel)
    assert secret in [m.payload for m in owner.until(secret)]  # it was there to see
    seen = snoop.until(sentinel)
    assert secret not in [m.payload for m in seen]
    assert {m.topic for m in seen} == {T.work("edge-1")}


def test_a_client_never_sees_another_clients_replies(connect: Callable[..., Bus]) -> None:
    snoop = watch(
        connect("client-1"), "#", P + "reply/+", f"$share/snoop/{P}reply/+", T.reply("client-2"),
        T.reply("client-1"),  # its own: where the sentinel comes (the rest is refused)
    )
    owner = watch(connect("client-2"), T.reply("client-2"))
    broker = connect("broker-3")
    secret, sentinel = uuid.uuid4().bytes, uuid.uuid4().bytes
    broker.publish(T.reply("client-2"), secret)
    broker.publish(T.reply("client-1"), sentinel)
    assert secret in [m.payload for m in owner.until(secret)]
    seen = snoop.until(sentinel)
    assert secret not in [m.payload for m in seen]
    assert {m.topic for m in seen} == {T.reply("client-1")}


def test_every_role_does_its_job_with_its_real_subscriptions(connect: Callable[..., Bus]) -> None:
    # The subscriptions cloud_broker, edge_agent and skyhop.client make, and a round
    # trip through them: the ACL is not so tight that the fleet cannot work.
    broker, edge, client, op = Inbox(), Inbox(), Inbox(), Inbox()
    b = connect("broker-2")
    for f in (
        T.req_shared("skyhop-brokers"),
        T.status_all,
        T.load_all,
        T.sla_all,
        T.broker_replies("broker-2"),
    ):
        b.subscribe(f, broker.put)
    e = connect("edge-2")
    for f in (T.work("edge-2"), T.ping("edge-2"), T.sla_all, P + "keys/#"):
        e.subscribe(f, edge.put)
    c = connect("client-2")
    for f in (T.reply("client-2"), T.sla_all, P + "keys/#"):
        c.subscribe(f, client.put)
    o = connect("op-2")
    for f in (T.broker_status, T.status_all, T.load_all):
        o.subscribe(f, op.put)
    c.publish(T.req("digits"), b"request")
    assert broker.until(b"request")[-1].topic == T.req("digits")
    b.publish(T.work("edge-2"), b"work")
    assert edge.until(b"work")[-1].topic == T.work("edge-2")
    e.publish(T.ping("edge-2"), b"ping")
    assert edge.until(b"ping")[-1].topic == T.ping("edge-2")
    e.publish(T.broker_replies("broker-2"), b"sealed reply")
    e.publish(T.load("edge-2"), b"load")
    assert broker.until(b"load")[-2].payload == b"sealed reply"
    assert op.until(b"load")[-1].topic == T.load("edge-2")
    b.publish(T.reply("client-2"), b"sealed reply")
    b.publish(T.broker_status, b"status")
    assert client.until(b"sealed reply")[-1].topic == T.reply("client-2")
    assert op.until(b"status")[-1].topic == T.broker_status
    o.stop()
    o = connect("op")  # the operator that writes: SLAs and key announcements
    o.publish(T.sla("digits"), b"sla")
    o.publish(T.keys, b"announcement")
    for inbox in (edge, client):
        assert [m.payload for m in inbox.until(b"announcement")] == [b"sla", b"announcement"]
    assert broker.until(b"sla")[-1].topic == T.sla("digits")


def test_an_agent_cannot_speak_for_another_in_its_own_status(fleet: Fleet) -> None:
    from cloud_broker.broker import Broker
    from skyhop.protocol.messages import NodeStatus

    broker = Broker(fleet.url, broker_id="broker-2", tls=fleet.tls("broker-2"))
    broker.start(timeout=5)
    try:
        liar = NodeStatus(node="edge-2", online=True, session=1, models=("digits",))
        honest = NodeStatus(node="edge-1", online=True, session=1, models=("digits",))
        assert publish_once(fleet, "edge-1", T.status("edge-1"), liar.encode()) == 0
        assert publish_once(fleet, "edge-1", T.status("edge-1"), honest.encode()) == 0
        deadline = time.monotonic() + 5
        while "edge-1" not in broker.fleet.nodes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "edge-1" in broker.fleet.nodes
        assert "edge-2" not in broker.fleet.nodes, "edge-1 made the broker see edge-2"
    finally:
        broker.stop()


# -- identities cannot be borrowed ----------------------------------------------------------


def test_another_certificate_cannot_take_over_a_nodes_client_id(
    fleet: Fleet, connect: Callable[..., Bus]
) -> None:
    node = connect("edge-1", client_id="edge-1")
    work = watch(node, T.work("edge-1"))
    thief = connect("edge-x", client_id="edge-1")  # Mosquitto makes its client id "edge-x"
    broker = connect("broker-3")
    broker.publish(T.work("edge-1"), b"still mine")
    assert work.until(b"still mine")
    assert node.connected and thief.connected
    assert node.counters["reconnects"] == 0  # its session was never taken over
    thief.stop()
    # And the thief's rights stay edge-x's: it cannot speak for edge-1 either.
    assert publish_once(fleet, "edge-x", T.status("edge-1"), b"me") == NOT_AUTHORIZED


def test_only_brokers_can_join_the_brokers_shared_subscription(connect: Callable[..., Bus]) -> None:
    # With Mosquitto's acl_file this failed: any identity could join the group, and
    # Mosquitto dropped the requests it dealt it (half of them, here). Now the
    # subscription is refused, and the brokers get every request.
    brokers = Inbox()
    connect("broker-2").subscribe(T.req_shared("skyhop-brokers"), brokers.put)
    intruder = connect("client-1")
    with pytest.raises(ConfigError, match="refused the subscription"):
        intruder.subscribe(T.req_shared("skyhop-brokers"), lambda m: None)
    with pytest.raises(ConfigError, match="refused the subscription"):
        connect("edge-1").subscribe(T.req_shared("other-group"), lambda m: None)
    client = connect("client-3")
    for i in range(20):
        client.publish(T.req("digits"), f"r{i}".encode())
    got = []
    with pytest.raises(queue.Empty):
        while True:
            got.append(brokers._q.get(timeout=1).payload)
    assert len(got) == 20, f"the brokers got {len(got)} of 20 requests"


def test_subscriptions_beyond_ones_rights_are_refused(connect: Callable[..., Bus]) -> None:
    for name, filt in [("edge-1", P + "#"), ("edge-1", T.work("edge-2")),
                       ("client-1", T.reply("client-2")), ("op", T.req_shared("skyhop-brokers")),
                       ("broker-1", P + "req/+")]:  # a broker only through the group
        with pytest.raises(ConfigError, match="refused the subscription"):
            connect(name).subscribe(filt, lambda m: None)


# -- issuing and revoking take effect with `skyhop acl apply` -----------------------------


def test_issue_and_revoke_apply_at_once(
    fleet: Fleet, connect: Callable[..., Bus], caplog: pytest.LogCaptureFixture
) -> None:
    """Runs last: it revokes edge-late and adds edge-new to the module's Mosquitto."""
    watcher = watch(connect("broker-2"), T.load_all)
    late = connect("edge-late")
    # The CRL reload is probed with a second revoked name: a probe as edge-late itself
    # would take over late's client id (use_username_as_clientid) if it won the race.
    fleet.pki.issue("edge-probe", "edge")
    fleet.pki.issue("edge-new", "edge")
    # A new certificate connects (the CA signed it) but has no rights before the apply.
    assert publish_once(fleet, "edge-new", T.load("edge-new"), b"x") == NOT_AUTHORIZED
    fleet.pki.revoke("edge-late")
    fleet.pki.revoke("edge-probe")
    _cli("mosquitto-config", "--home", fleet.home, "--port", fleet.port, "--bind", "127.0.0.1",
         "--files-dir", fleet.files, "--out", fleet.home / "m.conf")
    fleet.reload()
    deadline = time.monotonic() + 5
    while True:  # the reload is asynchronous: wait until the new CRL refuses edge-probe
        try:
            Bus(fleet.url, "edge-probe", tls=fleet.tls("edge-probe")).start(timeout=2).stop()
        except ConfigError as exc:
            assert "revoked" in str(exc)
            break
        except TransportError:
            pass
        assert time.monotonic() < deadline, "SIGHUP did not reload the CRL"
        time.sleep(0.05)
    _cli("acl", "apply", "--home", fleet.home, "--mqtt", fleet.url, "--identity", "op")
    # The rights are in force once `acl apply` returns.
    assert publish_once(fleet, "edge-new", T.load("edge-new"), b"x") == 0
    # The revoked node's open connection is closed; it keeps trying (a lapsed CRL
    # refuses everyone, and a fleet that gave up would need every device restarted),
    # refused each time, and says why once.
    while late.connected or late.counters["certificate_refused"] < 2:
        assert time.monotonic() < deadline + 10, "the revoked node is not refused"
        time.sleep(0.05)
    refusals = [r for r in caplog.records if "refuses our certificate" in r.getMessage()]
    assert len(refusals) == 1 and "revoked" in refusals[0].getMessage()
    with contextlib.suppress(TransportError):
        late.publish(T.load("edge-late"), b"after revocation")
    sentinel = uuid.uuid4().bytes
    connect("edge-2").publish(T.load("edge-2"), sentinel)
    assert b"after revocation" not in [m.payload for m in watcher.until(sentinel)]
    # A second apply has nothing left to do.
    with Bus(fleet.url, "op", tls=fleet.tls("op")) as op:
        now = dt.datetime.now(dt.timezone.utc)
        assert apply(op, desired(fleet.pki.entries(), T, now=now)) == []


def test_a_refused_publish_is_counted_by_the_bus(connect: Callable[..., Bus]) -> None:
    bus = connect("edge-1")
    bus.publish(T.load("edge-2"), b"not mine")
    deadline = time.monotonic() + 5
    while bus.counters["publish_refused"] == 0:
        assert time.monotonic() < deadline, "the PUBACK refusal was not counted"
        time.sleep(0.02)

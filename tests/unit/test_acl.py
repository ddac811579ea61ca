"""The rendered rights, judged by what they allow: a small evaluator with the
dynamic-security plugin's rules (each user's own role; a topic is allowed if an entry of
the role matches it with that access; everything else is denied) checks the role matrix
of docs/security.md. tests/integration/test_tls.py checks the real Mosquitto agrees."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from paho.mqtt.client import topic_matches_sub

from skyhop.errors import ConfigError
from skyhop.protocol.topics import Topics
from skyhop.security.acl import DEFAULT_ACCESS, GRANTS, ROLE_PREFIX, render
from skyhop.security.pki import ROLES, Issued

NOW = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
LATER = NOW + dt.timedelta(days=30)
P = "skyhop/v1/"


def issued(name: str, role: str, **kw: object) -> Issued:
    return Issued(name, role, hash(name) & 0xFFFF, LATER, **kw)


FLEET = [
    issued("edge-1", "edge"),
    issued("edge-2", "edge"),
    issued("cloud-1", "cloud"),
    issued("b1", "broker"),
    issued("b2", "broker"),
    issued("c1", "client"),
    issued("c2", "client"),
    issued("op", "operator"),
    issued("mqtt-server", "server"),
    issued("gone", "edge", revoked=True, revoked_at=NOW),
    Issued("old", "client", 1, NOW - dt.timedelta(days=1)),  # expired
]


ACCESS = {"read": "publishClientReceive", "write": "publishClientSend",
          "subscribe": "subscribePattern"}
Acl = dict[str, list[tuple[str, str]]]  # user -> (acltype, topic filter)


def parse(text: str) -> Acl:
    config = json.loads(text)
    assert config["defaultACLAccess"] == DEFAULT_ACCESS
    roles = {r["rolename"]: r["acls"] for r in config["roles"]}
    users: Acl = {}
    for client in config["clients"]:
        name = client["username"]
        assert name not in users, f"two clients {name}"
        assert client["roles"] == [{"rolename": ROLE_PREFIX + name}]  # its own role only
        acls = roles.pop(ROLE_PREFIX + name)
        assert all(a["allow"] is True for a in acls)
        users[name] = [(a["acltype"], a["topic"]) for a in acls]
    assert roles == {}, "a role no client has"
    return users


def allowed(acl: Acl, user: str, access: str, topic: str) -> bool:
    """May ``user`` publish (write) or be sent (read) ``topic``, or subscribe to it?"""
    kind = ACCESS[access]
    if access == "subscribe":  # what components subscribe to is granted as is
        return (kind, topic) in acl.get(user, [])
    return any(t == kind and topic_matches_sub(f, topic) for t, f in acl.get(user, []))


@pytest.fixture(scope="module")
def acl() -> dict[str, list[tuple[str, str]]]:
    return parse(render(FLEET, Topics(P), now=NOW))


AGENT_MATRIX = [
    ("write", "nodes/{me}/status", True),
    ("read", "nodes/{me}/status", True),  # to notice a second process as this node
    ("write", "nodes/{me}/load", True),
    ("write", "nodes/{me}/ping", True),
    ("read", "nodes/{me}/ping", True),
    ("read", "nodes/{me}/work", True),
    ("read", "nodes/{me}/req/digits", True),
    ("write", "broker/b1/replies", True),
    ("read", "config/sla/digits", True),
    ("read", "keys/fleet", True),
    ("write", "nodes/{other}/status", False),
    ("write", "nodes/{other}/load", False),
    ("write", "nodes/{other}/ping", False),
    ("read", "nodes/{other}/work", False),
    ("read", "nodes/{other}/req/digits", False),
    ("read", "nodes/{other}/load", False),
    ("read", "nodes/{other}/status", False),
    ("write", "nodes/{me}/work", False),
    ("write", "reply/c1", False),
    ("write", "req/digits", False),
    ("write", "config/sla/digits", False),
    ("write", "keys/fleet", False),
    ("write", "broker/status", False),
    ("read", "req/digits", False),
    ("read", "broker/b1/replies", False),
    ("read", "reply/c1", False),
    ("read", "broker/status", False),
]


@pytest.mark.parametrize(("me", "other"), [("edge-1", "edge-2"), ("cloud-1", "edge-1")])
@pytest.mark.parametrize(("access", "topic", "ok"), AGENT_MATRIX)
def test_agent_rights(acl, me: str, other: str, access: str, topic: str, ok: bool) -> None:
    assert allowed(acl, me, access, P + topic.format(me=me, other=other)) is ok


@pytest.mark.parametrize(
    ("user", "access", "topic", "ok"),
    [
        # broker: reads requests, status, load, SLAs and its own replies; writes work,
        # replies and broker/status
        ("b1", "read", "req/digits", True),
        ("b1", "read", "nodes/edge-1/status", True),
        ("b1", "read", "nodes/edge-1/load", True),
        ("b1", "read", "config/sla/digits", True),
        ("b1", "read", "broker/b1/replies", True),
        ("b1", "write", "nodes/edge-1/work", True),
        ("b1", "write", "reply/c1", True),
        ("b1", "write", "broker/status", True),
        ("b1", "read", "broker/b2/replies", False),
        ("b1", "write", "req/digits", False),
        ("b1", "write", "nodes/edge-1/status", False),
        ("b1", "write", "nodes/edge-1/load", False),
        ("b1", "write", "config/sla/digits", False),
        ("b1", "write", "keys/fleet", False),
        ("b1", "write", "broker/b1/replies", False),
        ("b1", "write", "broker/b1/lost", True),  # its Will
        ("b1", "write", "broker/b2/lost", False),  # not another broker's death
        ("b1", "read", "nodes/edge-1/work", False),
        ("b1", "read", "reply/c1", False),
        # client: writes requests; reads its own replies, SLAs and key announcements
        ("c1", "write", "req/digits", True),
        ("c1", "read", "reply/c1", True),
        ("c1", "read", "config/sla/digits", True),
        ("c1", "read", "keys/fleet", True),
        ("c1", "read", "broker/b1/lost", True),  # to send again what b1 held
        ("c1", "write", "broker/b1/lost", False),
        ("c1", "read", "reply/c2", False),
        ("c1", "write", "reply/c1", False),
        ("c1", "write", "reply/c2", False),
        ("c1", "write", "nodes/edge-1/work", False),
        ("c1", "write", "config/sla/digits", False),
        ("c1", "write", "keys/fleet", False),
        ("c1", "write", "broker/b1/replies", False),
        ("c1", "read", "req/digits", False),
        ("c1", "read", "nodes/edge-1/status", False),
        ("c1", "read", "broker/status", False),
        # operator: writes SLAs and key announcements; reads status and load
        ("op", "write", "config/sla/digits", True),
        ("op", "write", "keys/fleet", True),
        ("op", "read", "broker/status", True),
        ("op", "read", "nodes/edge-1/status", True),
        ("op", "read", "nodes/edge-1/load", True),
        ("op", "write", "req/digits", False),
        ("op", "write", "nodes/edge-1/work", False),
        ("op", "write", "reply/c1", False),
        ("op", "write", "broker/status", False),
        ("op", "write", "nodes/edge-1/status", False),
        ("op", "read", "reply/c1", False),
        ("op", "read", "nodes/edge-1/work", False),
        ("op", "read", "req/digits", False),
    ],
)
def test_broker_client_operator_rights(acl, user: str, access: str, topic: str, ok: bool) -> None:
    assert allowed(acl, user, access, P + topic) is ok


@pytest.mark.parametrize("user", ["edge-1", "b1", "c1", "op"])
def test_nothing_outside_the_prefix_or_in_sys(acl, user: str) -> None:
    for access in ("read", "write"):
        assert not allowed(acl, user, access, "$SYS/broker/clients/connected")
        assert not allowed(acl, user, access, "other/v1/req/digits")
        assert not allowed(acl, user, access, "other/v1/nodes/edge-1/work")


def test_only_brokers_may_join_the_brokers_group(acl) -> None:
    share = f"$share/skyhop-brokers/{P}req/+"
    assert allowed(acl, "b1", "subscribe", share)
    assert not allowed(acl, "b1", "subscribe", P + "req/+")  # every request, unshared
    for user in ("edge-1", "c1", "op"):
        assert not allowed(acl, user, "subscribe", share)
    assert allowed(acl, "edge-1", "subscribe", P + "nodes/edge-1/work")
    assert not allowed(acl, "edge-1", "subscribe", P + "nodes/edge-2/work")


def test_only_operators_may_change_the_rights(acl) -> None:
    control = "$CONTROL/dynamic-security/v1"
    assert allowed(acl, "op", "write", control)
    assert allowed(acl, "op", "read", control + "/response")
    for user in ("edge-1", "b1", "c1"):
        assert not allowed(acl, user, "write", control)


def test_revoked_expired_and_server_names_get_no_block(acl) -> None:
    assert set(acl) == {"edge-1", "edge-2", "cloud-1", "b1", "b2", "c1", "c2", "op"}


def test_a_renewed_name_appears_once_and_output_is_stable() -> None:
    fleet = [*FLEET, issued("edge-1", "edge")]
    text = render(fleet, Topics(P), now=NOW)
    assert text == render(list(reversed(fleet)), Topics(P), now=NOW)
    users = [c["username"] for c in json.loads(text)["clients"]]
    assert users == ["edge-1", "edge-2", "cloud-1", "b1", "b2", "c1", "c2", "op"]


def test_expiry_is_judged_at_render_time() -> None:
    later = parse(render(FLEET, Topics(P), now=LATER + dt.timedelta(seconds=1)))
    assert later == {}


def test_the_prefix_is_applied() -> None:
    acl = parse(render(FLEET, Topics("plant-7/skyhop/"), now=NOW))
    assert allowed(acl, "edge-1", "write", "plant-7/skyhop/nodes/edge-1/load")
    assert not allowed(acl, "edge-1", "write", P + "nodes/edge-1/load")


@pytest.mark.parametrize("prefix", ["a b/", "a%u/", "tab\t/"])
def test_prefixes_mosquitto_cannot_read_are_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="cannot go in a Mosquitto ACL"):
        render(FLEET, Topics(prefix), now=NOW)


def test_agents_reply_to_clients_only_when_asked() -> None:
    acl = parse(render(FLEET, Topics(P), now=NOW, agents_reply_to_clients=True))
    assert allowed(acl, "edge-1", "write", P + "reply/c1")
    assert not allowed(acl, "c1", "write", P + "reply/c2")
    assert not allowed(acl, "edge-1", "read", P + "reply/c1")


def test_every_role_has_a_policy() -> None:
    assert set(GRANTS) == set(ROLES)
    assert GRANTS["edge"] == GRANTS["cloud"] and GRANTS["server"] == ()

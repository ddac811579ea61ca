"""What each identity may publish, read and subscribe to, by role: Mosquitto's
dynamic-security plugin configuration, rendered from the PKI registry.

Mosquitto is run with ``use_identity_as_username true``, so an MQTT username is the CN
of a certificate our CA signed, and the rights of a name come from its role in the
PKI registry (skyhop.security.pki)::

    rights = desired(Pki(home).entries(), Topics(prefix), now=now)   # name -> ACL entries
    text = render(Pki(home).entries(), Topics(prefix), now=now)      # the plugin's JSON

Why the dynamic-security plugin and not ``acl_file``: Mosquitto 2.0's ``acl_file``
grants every SUBSCRIBE (security_default.c: "FIXME - implement ACL subscription
strings"), so any identity could join the brokers' shared subscription and swallow its
share of the requests (docs/adr/0005-dynamic-security.md). The plugin checks
subscriptions (``subscribePattern``) as well as publishes and deliveries.

Every identity gets a client and one role of its own (``skyhop:NAME``), not shared
roles with ``%u`` patterns, because:

- a pattern applies to every username, whatever its role: a ``nodes/%u/load`` grant
  would also let a client named ``cam-9`` pose as a node;
- a name with no active certificate in the registry (revoked, expired, or never issued
  here) then is no client, hence has no rights at all, even if it still holds a
  certificate the CRL has not caught up with;
- the configuration lists exactly who may do what, so it can be reviewed and diffed.

The plugin reads its file only when Mosquitto starts (not on SIGHUP), so a running
Mosquitto is brought to the registry's state by ``skyhop acl apply`` (skyhop.security.dynsec).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable

from skyhop.errors import ConfigError
from skyhop.protocol.topics import BROKERS_GROUP, Topics
from skyhop.security.pki import AGENT_ROLES, ROLES, Issued, check_cert_name

# (access, topic after the prefix): ``{name}`` is the identity's CN. ``read`` is the
# right to subscribe to the filter and be sent what matches it; ``share`` the same, but
# only through the brokers' shared subscription. The table IS the policy;
# docs/security.md §Roles and tests/unit/test_acl.py restate it.
_AGENT = (
    # Birth, clean death and the Will; read back to notice a second process as this node.
    ("readwrite", "nodes/{name}/status"),
    ("write", "nodes/{name}/load"),
    ("readwrite", "nodes/{name}/ping"),  # agents ping themselves to measure the RTT
    ("read", "nodes/{name}/work"),
    ("read", "nodes/{name}/req/#"),
    ("write", "broker/+/replies"),  # the work's Response Topic names the broker replica
    ("read", "config/sla/+"),
    ("read", "keys/#"),
)
GRANTS: dict[str, tuple[tuple[str, str], ...]] = {
    "edge": _AGENT,
    "cloud": _AGENT,
    "broker": (
        ("share", "req/+"),  # $share/skyhop-brokers/<prefix>req/+, and nothing else
        ("read", "nodes/+/status"),
        ("read", "nodes/+/load"),
        ("read", "config/sla/+"),
        ("read", "broker/{name}/replies"),  # its own: the broker id must be its CN
        ("write", "nodes/+/work"),
        ("write", "reply/+"),
        ("write", "broker/status"),
        ("write", "broker/{name}/lost"),  # its Will: clients re-send what it held
    ),
    "client": (
        ("write", "req/+"),
        ("read", "reply/{name}"),  # the client id, hence the reply topic, is its CN
        ("read", "config/sla/+"),
        ("read", "keys/#"),
        ("read", "broker/+/lost"),
    ),
    "operator": (
        ("readwrite", "config/sla/+"),  # read back what it set: SLAs are not secret
        ("readwrite", "keys/#"),  # public keys and signed announcements
        ("read", "broker/status"),
        ("read", "nodes/+/status"),
        ("read", "nodes/+/load"),
    ),
    "site": (),  # the union of its agents' grants: ``site_entries``
    "server": (),  # the MQTT server's own certificate logs in as nobody
}
# Off by default: protocol.md §9.5 relies on only brokers publishing to reply topics,
# since a clear error reply there is unauthenticated and anyone who can publish it can
# make a client give up on a request.
AGENT_CLIENT_REPLIES = ("write", "reply/+")

# Operators keep the plugin's rights up to date (``skyhop acl apply``).
CONTROL = "$CONTROL/dynamic-security/#"
ROLE_PREFIX = "skyhop:"
# Nothing that is not granted: the plugin then defers, and with no other plugin
# Mosquitto denies. Unsubscribing is harmless.
DEFAULT_ACCESS = {"publishClientSend": False, "publishClientReceive": False,
                  "subscribe": False, "unsubscribe": True}

assert set(GRANTS) == set(ROLES)


def grants(
    name: str, role: str, topics: Topics, *, agents_reply_to_clients: bool = False
) -> list[tuple[str, str]]:
    """The (access, topic filter) lines of ``name`` in ``role``, prefix included."""
    check_cert_name(name)
    if role not in GRANTS:
        raise ConfigError(f"unknown role {role!r} for {name!r}")
    lines = list(GRANTS[role])
    if agents_reply_to_clients and role in AGENT_ROLES:
        lines.append(AGENT_CLIENT_REPLIES)
    return [(access, topics.prefix + topic.format(name=name)) for access, topic in lines]


def acl_entries(
    name: str, role: str, topics: Topics, *, agents_reply_to_clients: bool = False
) -> list[dict[str, object]]:
    """``name``'s grants as the plugin's ACL entries (acltype, topic, allow), sorted."""
    entries = set()
    for access, topic in grants(name, role, topics,
                                agents_reply_to_clients=agents_reply_to_clients):
        if access in ("read", "readwrite", "share"):
            entries.add(("publishClientReceive", topic))
            shared = f"$share/{BROKERS_GROUP}/{topic}" if access == "share" else topic
            entries.add(("subscribePattern", shared))
        if access in ("write", "readwrite"):
            entries.add(("publishClientSend", topic))
    if role == "operator":
        for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern"):
            entries.add((acltype, CONTROL))
    return [{"acltype": a, "topic": t, "allow": True} for a, t in sorted(entries)]


def desired(
    entries: Iterable[Issued],
    topics: Topics,
    *,
    now: dt.datetime,
    agents_reply_to_clients: bool = False,
) -> dict[str, list[dict[str, object]]]:
    """name -> ACL entries, for every name with an active certificate at ``now``.

    Revoked and expired certificates grant nothing; a name renewed under the same role
    appears once; a server certificate logs in as nobody; a site may do what its active
    agents may (``site_entries``).
    """
    _check_prefix(topics.prefix)
    roles: dict[str, str] = {}
    members: dict[str, dict[str, str]] = {}  # site -> {agent: role}
    for item in entries:
        if item.active(now):
            roles[item.name] = item.role
            if item.site is not None:
                members.setdefault(item.site, {})[item.name] = item.role
    order = sorted(roles.items(), key=lambda kv: (ROLES.index(kv[1]), kv[0]))
    rights: dict[str, list[dict[str, object]]] = {}
    for name, role in order:
        if role == "site":
            rights[name] = site_entries(members.get(name, {}), topics,
                                        agents_reply_to_clients=agents_reply_to_clients)
        elif GRANTS[role]:
            rights[name] = acl_entries(name, role, topics,
                                       agents_reply_to_clients=agents_reply_to_clients)
    return rights


def site_entries(
    agents: dict[str, str], topics: Topics, *, agents_reply_to_clients: bool = False
) -> list[dict[str, object]]:
    """A site's bridge may do at the cloud what each of its agents may: the union of
    their entries, no more (a site cannot pose as another site's node)."""
    union = {
        (str(e["acltype"]), str(e["topic"]))
        for agent, role in agents.items()
        for e in acl_entries(agent, role, topics, agents_reply_to_clients=agents_reply_to_clients)
    }
    return [{"acltype": a, "topic": t, "allow": True} for a, t in sorted(union)]


def config(rights: dict[str, list[dict[str, object]]]) -> dict[str, object]:
    """The plugin's configuration file for ``rights`` (from ``desired``)."""
    return {
        "clients": [{"username": name, "textname": "skyhop: rendered from the PKI registry",
                     "roles": [{"rolename": ROLE_PREFIX + name}]} for name in rights],
        "groups": [],
        "roles": [{"rolename": ROLE_PREFIX + name, "acls": acls}
                  for name, acls in rights.items()],
        "defaultACLAccess": DEFAULT_ACCESS,
    }


def render(
    entries: Iterable[Issued],
    topics: Topics,
    *,
    now: dt.datetime,
    agents_reply_to_clients: bool = False,
) -> str:
    """The plugin's configuration file (JSON) for every name active at ``now``."""
    rights = desired(entries, topics, now=now, agents_reply_to_clients=agents_reply_to_clients)
    return json.dumps(config(rights), indent=1) + "\n"


def _check_prefix(prefix: str) -> None:
    # A '%' would be taken for a pattern substitution by some ACL checks, and spaces and
    # control characters have no place in a topic an operator reads; keep prefixes plain.
    if any(c.isspace() or c in "%\0" or ord(c) < 0x20 for c in prefix):
        raise ConfigError(
            f"topic prefix {prefix!r} cannot go in a Mosquitto ACL: "
            "no spaces, control characters or '%'"
        )

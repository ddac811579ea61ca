"""Bring a running Mosquitto's rights to the PKI registry's: ``skyhop acl apply``.

    count, commands = apply_registry(Pki(home), url, "operator", prefix)

or, with rights of one's own making, ``apply(bus, rights)`` on a Bus connected as an
operator.

Mosquitto's dynamic-security plugin reads its file only when Mosquitto starts; a running
one is changed by commands published to ``$CONTROL/dynamic-security/v1`` by a client its
rights allow (operators: skyhop.security.acl). ``plan`` (pure) turns what the plugin holds and
what the registry wants into those commands. It touches only what skyhop made: clients
with a ``skyhop:NAME`` role, and those roles. Deleting a client closes its connections,
so a revoked identity loses an open session as well as its rights.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from skyhop.errors import ConfigError
from skyhop.mqtt.bus import Bus
from skyhop.mqtt.message import Message
from skyhop.mqtt.url import TlsFiles
from skyhop.protocol.topics import Topics
from skyhop.security.acl import ROLE_PREFIX, desired
from skyhop.security.pki import Pki

TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE = TOPIC + "/response"
# Commands per message. The plugin rewrites its whole file after each command, so a
# change costs time in proportion to the fleet (measured with 2.0.11: 100 new identities
# in 0.3 s, 1,000 in 23 s); a batch answers within the timeout and shows progress.
BATCH = 100

Entry = tuple[str, str, bool]  # (acltype, topic, allow)
Rights = Mapping[str, Sequence[Mapping[str, object]]]  # name -> ACL entries (skyhop.security.acl)


@dataclass(frozen=True)
class Live:
    """What the plugin holds: each client's roles, each role's ACL entries."""

    clients: dict[str, frozenset[str]] = field(default_factory=dict)
    roles: dict[str, frozenset[Entry]] = field(default_factory=dict)


def plan(live: Live, want: Rights) -> list[dict[str, object]]:
    """The commands that turn ``live`` into ``want``, in an order the plugin accepts."""
    commands: list[dict[str, object]] = []
    for name, acls in want.items():
        role = ROLE_PREFIX + name
        wanted = {_entry(a) for a in acls}
        have = live.roles.get(role)
        if have is None:
            commands.append({"command": "createRole", "rolename": role, "acls": list(acls)})
        else:
            # Entry by entry, so that the identity never goes without the rights it keeps.
            commands += [{"command": "addRoleACL", "rolename": role, "acltype": t,
                          "topic": topic, "allow": allow}
                         for t, topic, allow in sorted(wanted - have)]
            commands += [{"command": "removeRoleACL", "rolename": role, "acltype": t,
                          "topic": topic} for t, topic, _ in sorted(have - wanted)]
        if name not in live.clients:
            commands.append({"command": "createClient", "username": name,
                             "roles": [{"rolename": role}]})
        elif role not in live.clients[name]:
            commands.append({"command": "addClientRole", "username": name, "rolename": role})
    ours = sorted(r.removeprefix(ROLE_PREFIX) for r in live.roles if r.startswith(ROLE_PREFIX))
    for name in (n for n in ours if n not in want):
        if ROLE_PREFIX + name in live.clients.get(name, ()):
            commands.append({"command": "deleteClient", "username": name})  # disconnects it
        commands.append({"command": "deleteRole", "rolename": ROLE_PREFIX + name})
    return commands


def summary(commands: Sequence[Mapping[str, object]]) -> str:
    """What ``commands`` do, by identity: "added a, b; removed c; changed d"."""
    verbs = {"createClient": "added", "addClientRole": "added", "deleteClient": "removed",
             "addRoleACL": "changed", "removeRoleACL": "changed"}
    names: dict[str, set[str]] = {}
    for c in commands:
        verb = verbs.get(str(c["command"]))
        if verb is not None:
            name = str(c.get("username") or c["rolename"]).removeprefix(ROLE_PREFIX)
            names.setdefault(verb, set()).add(name)
    parts = [f"{verb} {_some(sorted(names[verb]))}"
             for verb in ("added", "removed", "changed") if verb in names]
    return "; ".join(parts) or "nothing to change"


def _some(names: list[str], shown: int = 10) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def live_state(clients: Sequence[Mapping[str, object]],
               roles: Sequence[Mapping[str, object]]) -> Live:
    """``Live`` from the ``data`` of verbose listClients and listRoles answers."""
    return Live(
        clients={str(c["username"]): frozenset(str(r["rolename"]) for r in _rows(c, "roles"))
                 for c in clients},
        roles={str(r["rolename"]): frozenset(_entry(a) for a in _rows(r, "acls"))
               for r in roles},
    )


def _rows(answer: Mapping[str, object], key: str) -> Sequence[Mapping[str, object]]:
    """``answer[key]``, a list of objects in the plugin's JSON (none if it has no such key)."""
    rows = answer.get(key, [])
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
        raise ConfigError(f"the dynamic-security plugin answered a {key!r} that is not a list "
                          f"of objects: {rows!r}")
    return rows


def apply_registry(pki: Pki, url: str, identity: str, prefix: str, *,
                   agents_reply_to_clients: bool = False,
                   progress: Callable[[int, int], None] | None = None,
                   ) -> tuple[int, list[dict[str, object]]]:
    """Give the Mosquitto at ``url`` the rights of ``pki``'s active certificates,
    connected as ``identity`` (an operator of ``pki``): (identities with rights, the
    commands sent)."""
    rights = desired(pki.entries(), Topics(prefix), now=dt.datetime.now(dt.timezone.utc),
                     agents_reply_to_clients=agents_reply_to_clients)
    with Bus(url, identity, tls=TlsFiles(*pki.credentials(identity))) as bus:
        return len(rights), apply(bus, rights, progress=progress)


def apply(bus: Bus, want: Rights, timeout: float = 10.0,
          progress: Callable[[int, int], None] | None = None) -> list[dict[str, object]]:
    """Make the plugin behind ``bus`` (connected as an operator) hold ``want``; return
    the commands sent. Raises ConfigError if the plugin refuses one or does not answer,
    or if ``want`` has no rights for the bus's own identity (it would cut itself off).
    ``progress(done, total)`` is called after each batch of commands."""
    if bus.client_id not in want:
        raise ConfigError(
            f"{bus.client_id} has no active certificate with rights in the registry: "
            "applying would remove its own; connect as another operator (--identity)"
        )
    answers: queue.Queue[bytes] = queue.Queue()

    def on_answer(msg: Message) -> None:
        answers.put(msg.payload)

    try:
        bus.subscribe(RESPONSE, on_answer, qos=1, timeout=timeout)
    except ConfigError:
        raise ConfigError(
            f"{bus.client_id} may not manage Mosquitto's rights: connect with an "
            "operator certificate (--identity)"
        ) from None
    listed = _call(bus, answers, [
        {"command": "listClients", "verbose": True, "count": -1},
        {"command": "listRoles", "verbose": True, "count": -1},
    ], timeout)
    live = live_state(_rows(listed[0], "clients"), _rows(listed[1], "roles"))
    commands = plan(live, want)
    for start in range(0, len(commands), BATCH):
        _call(bus, answers, commands[start:start + BATCH], timeout)
        if progress is not None:
            progress(min(start + BATCH, len(commands)), len(commands))
    return commands


def _call(bus: Bus, answers: queue.Queue[bytes], commands: list[dict[str, object]],
          timeout: float) -> list[dict[str, object]]:
    """Send ``commands`` as one message; the ``data`` of each answer, in order."""
    bus.publish(TOPIC, json.dumps({"commands": commands}).encode(), qos=1)
    try:
        reply = json.loads(answers.get(timeout=timeout))
    except queue.Empty:
        raise ConfigError(
            f"Mosquitto at {bus.url} did not answer on {RESPONSE} within {timeout:g} s: is "
            "it running with the dynamic-security plugin (`skyhop mosquitto-config`)?"
        ) from None
    responses = reply.get("responses", [])
    failed = [f"{r.get('command')}: {r['error']}" for r in responses if r.get("error")]
    if failed or len(responses) != len(commands):
        raise ConfigError(f"Mosquitto refused the ACL change: {'; '.join(failed) or reply}")
    return [r.get("data", {}) for r in responses]


def _entry(acl: Mapping[str, object]) -> Entry:
    return str(acl["acltype"]), str(acl["topic"]), bool(acl.get("allow", False))

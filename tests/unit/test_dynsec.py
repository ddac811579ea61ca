"""``skyhop.security.dynsec.plan``: the commands that bring the plugin to the registry's rights.
tests/integration/test_tls.py runs them against a real Mosquitto."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from skyhop.errors import ConfigError
from skyhop.security.dynsec import BATCH, Live, apply, live_state, plan, summary


def acl(acltype: str, topic: str) -> dict[str, object]:
    return {"acltype": acltype, "topic": topic, "allow": True}


LOAD = acl("publishClientSend", "p/nodes/e1/load")
WORK = acl("publishClientReceive", "p/nodes/e1/work")
SUB = acl("subscribePattern", "p/nodes/e1/work")
WANT = {"e1": [LOAD, WORK, SUB]}


def live(clients: dict[str, list[str]], roles: dict[str, list[dict[str, object]]]) -> Live:
    return live_state(
        [{"username": u, "roles": [{"rolename": r} for r in rs]} for u, rs in clients.items()],
        [{"rolename": r, "acls": [{**a, "priority": -1} for a in acls]}
         for r, acls in roles.items()],
    )


def test_a_new_name_gets_its_role_then_its_client() -> None:
    assert plan(Live(), WANT) == [
        {"command": "createRole", "rolename": "skyhop:e1", "acls": [LOAD, WORK, SUB]},
        {"command": "createClient", "username": "e1", "roles": [{"rolename": "skyhop:e1"}]},
    ]


def test_nothing_to_do_when_the_plugin_already_holds_the_rights() -> None:
    assert plan(live({"e1": ["skyhop:e1"]}, {"skyhop:e1": [SUB, LOAD, WORK]}), WANT) == []


def test_changed_rights_are_changed_entry_by_entry_added_first() -> None:
    old = acl("publishClientSend", "p/nodes/e1/old")
    got = plan(live({"e1": ["skyhop:e1"]}, {"skyhop:e1": [LOAD, WORK, old]}), WANT)
    assert got == [
        {"command": "addRoleACL", "rolename": "skyhop:e1", "acltype": "subscribePattern",
         "topic": "p/nodes/e1/work", "allow": True},
        {"command": "removeRoleACL", "rolename": "skyhop:e1", "acltype": "publishClientSend",
         "topic": "p/nodes/e1/old"},
    ]


def test_a_revoked_name_is_deleted_and_so_disconnected() -> None:
    state = live({"e1": ["skyhop:e1"], "gone": ["skyhop:gone"]},
                 {"skyhop:e1": [LOAD, WORK, SUB], "skyhop:gone": [LOAD]})
    assert plan(state, WANT) == [
        {"command": "deleteClient", "username": "gone"},
        {"command": "deleteRole", "rolename": "skyhop:gone"},
    ]


def test_what_skyhop_did_not_make_is_left_alone() -> None:
    state = live({"admin": ["admin"], "e1": ["skyhop:e1"]},
                 {"admin": [acl("publishClientSend", "#")], "skyhop:e1": [LOAD, WORK, SUB]})
    assert plan(state, WANT) == []


def test_half_done_states_are_completed() -> None:
    # A client made by hand gets its role; a role left without its client is removed.
    state = live({"e1": ["admin"]}, {"skyhop:e1": [LOAD, WORK, SUB], "skyhop:x": []})
    assert plan(state, WANT) == [
        {"command": "addClientRole", "username": "e1", "rolename": "skyhop:e1"},
        {"command": "deleteRole", "rolename": "skyhop:x"},
    ]


def test_the_summary_names_identities_not_commands() -> None:
    state = live({"gone": ["skyhop:gone"], "e2": ["skyhop:e2"]},
                 {"skyhop:gone": [LOAD], "skyhop:e2": [LOAD]})
    want = {**WANT, "e2": [LOAD, WORK]}
    assert summary(plan(state, want)) == "added e1; removed gone; changed e2"
    assert summary([]) == "nothing to change"
    many = plan(Live(), {f"e{i:02}": [LOAD] for i in range(25)})
    assert summary(many) == "added e00, e01, e02, e03, e04, e05, e06, e07, e08, e09 and 15 more"


class FakePlugin:
    """Answers each command message the way the plugin does: one response per command,
    in order; the list commands report ``state``. Records the batches it was sent."""

    client_id, url = "op", "mqtts://test"

    def __init__(self, state: Live) -> None:
        self.state, self.batches, self.handler = state, [], None

    def subscribe(self, topic: str, handler, qos: int = 1, timeout: float = 5.0) -> None:
        self.handler = handler

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        commands = json.loads(payload)["commands"]
        self.batches.append(len(commands))
        clients = [{"username": u, "roles": [{"rolename": r} for r in rs]}
                   for u, rs in self.state.clients.items()]
        data = {"listClients": {"clients": clients}, "listRoles": {"roles": []}}
        answer = {"responses": [{"command": c["command"], "data": data.get(c["command"], {})}
                                for c in commands]}
        self.handler(SimpleNamespace(payload=json.dumps(answer).encode()))


def test_changes_go_in_batches_with_progress() -> None:
    want = {f"e{i}": [LOAD] for i in range(120)} | {"op": [LOAD]}
    plugin, seen = FakePlugin(Live(clients={"op": frozenset({"skyhop:op"})})), []
    commands = apply(plugin, want, progress=lambda done, total: seen.append((done, total)))
    # 121 roles to create, 120 clients (op is one already): 241 commands after the lists.
    assert len(commands) == 241 and plugin.batches == [2, BATCH, BATCH, 41]
    assert seen == [(100, 241), (200, 241), (241, 241)]


def test_an_operator_cannot_apply_rights_that_cut_it_off() -> None:
    plugin = FakePlugin(Live())
    with pytest.raises(ConfigError, match="op has no active certificate"):
        apply(plugin, WANT)
    assert plugin.batches == []

"""An edge site's bridge: what its Mosquitto carries (skyhop.security.bridge), and what
the site's identity may do at the cloud (skyhop.security.acl.site_entries). The live
bridge, plain and over mutual TLS, is tests/integration/test_sites.py."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from paho.mqtt.client import topic_matches_sub

from skyhop.errors import ConfigError
from skyhop.protocol.topics import Topics
from skyhop.security.acl import desired
from skyhop.security.bridge import Bridge, render, site_nodes, topic_lines
from skyhop.security.pki import Issued

NOW = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
LATER = NOW + dt.timedelta(days=30)
P = "skyhop/v1/"
T = Topics(P)

FLEET = [
    Issued("site-a", "site", 1, LATER),
    Issued("site-b", "site", 2, LATER),
    Issued("cam-1", "edge", 3, LATER, site="site-a"),
    Issued("cam-2", "edge", 4, LATER, site="site-a"),
    Issued("cam-9", "edge", 5, LATER, site="site-b"),
    Issued("cam-gone", "edge", 6, LATER, revoked=True, revoked_at=NOW, site="site-a"),
    Issued("cloud-1", "cloud", 7, LATER),
    Issued("b1", "broker", 8, LATER),
]


def test_a_site_carries_its_own_agents_only() -> None:
    assert site_nodes(FLEET, "site-a", NOW) == ("cam-1", "cam-2")  # not the revoked one
    lines = topic_lines(Bridge("site-a", "cloud", 8883, ("cam-1",), T))
    assert (T.work("cam-1"), "in") in lines and (T.load("cam-1"), "out") in lines
    assert (T.status("cam-1"), "out") in lines and (P + "broker/+/replies", "out") in lines
    assert not any("cam-9" in topic or "+/work" in topic for topic, _ in lines)


def test_the_bridge_section_is_mutual_tls_when_given_files() -> None:
    text = render(Bridge("site-a", "cloud.example.org", 8883, ("cam-1",), T,
                         tls=Path("/etc/mosquitto/skyhop")))
    assert "connection site-a\naddress cloud.example.org:8883\n" in text
    assert "bridge_certfile /etc/mosquitto/skyhop/bridge.crt" in text
    assert "bridge_tls_version tlsv1.3" in text and "bridge_insecure false" in text
    assert f"topic {T.work('cam-1')} in 1" in text
    assert "bridge_cafile" not in render(Bridge("site-a", "h", 1883, ("cam-1",), T))


def test_a_site_with_no_agent_says_how_to_add_one() -> None:
    assert "certs issue NODE --role edge --site site-x" in render(
        Bridge("site-x", "h", 1883, (), T))


def test_names_that_would_break_a_topic_are_refused() -> None:
    with pytest.raises(ConfigError):
        Bridge("site/a", "h", 1883, (), T)
    with pytest.raises(ConfigError):
        Bridge("site-a", "h", 1883, ("cam+1",), T)


def _may(rights: dict, user: str, acltype: str, topic: str) -> bool:
    return any(e["acltype"] == acltype and topic_matches_sub(str(e["topic"]), topic)
               for e in rights[user])


def test_a_site_may_act_for_its_agents_and_no_other_node() -> None:
    rights = desired(FLEET, T, now=NOW)
    assert _may(rights, "site-a", "publishClientSend", T.load("cam-2"))
    assert _may(rights, "site-a", "publishClientSend", T.status("cam-1"))
    assert _may(rights, "site-a", "publishClientReceive", T.work("cam-1"))
    assert {"acltype": "subscribePattern", "topic": T.work("cam-1"),
            "allow": True} in rights["site-a"]
    for topic in (T.load("cam-9"), T.status("cloud-1"), T.load("cam-gone")):
        assert not _may(rights, "site-a", "publishClientSend", topic)
    assert not _may(rights, "site-a", "publishClientReceive", T.work("cam-9"))
    assert not _may(rights, "site-a", "publishClientSend", T.req("digits"))  # no client
    assert _may(rights, "site-b", "publishClientSend", T.load("cam-9"))


def test_site_membership_survives_the_registry_round_trip() -> None:
    item = FLEET[2]
    assert Issued.from_json(item.to_json()) == item
    legacy = {k: v for k, v in FLEET[7].to_json().items() if k != "site"}  # older index.json
    assert Issued.from_json(legacy).site is None


def test_the_cli_issues_a_site_and_its_agents_and_refuses_what_cannot_work(
    tmp_path: Path, capsys
) -> None:
    from skyhop.cli import main

    home = str(tmp_path)
    main(["certs", "init", "--home", home])
    main(["certs", "issue", "site-a", "--role", "site", "--home", home])
    main(["certs", "issue", "cam-1", "--role", "edge", "--site", "site-a", "--home", home])
    assert "mosquitto-config --site site-a --bridge-to" in capsys.readouterr().out
    main(["certs", "list", "--home", home])
    assert any("cam-1" in line and "site-a" in line
               for line in capsys.readouterr().out.splitlines())
    refusals = {
        "--site is for agents": ["certs", "issue", "b1", "--role", "broker", "--site",
                                 "site-a"],
        "mutual TLS only": ["mosquitto-config", "--port", "8883", "--site", "site-a",
                            "--bridge-to", "mqtt://cloud:1883"],
        "needs --site": ["mosquitto-config", "--port", "8883", "--bridge-to",
                         "mqtts://cloud:8883"],
        "give --bridge-to": ["mosquitto-config", "--port", "8883", "--site", "site-a"],
        "no active site certificate 'cam-1'": [
            "mosquitto-config", "--port", "8883", "--site", "cam-1", "--bridge-to",
            "mqtts://cloud:8883", "--files-dir", str(tmp_path / "files")],
    }
    for said, args in refusals.items():
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--home", home])
        assert exit_.value.code == 1
        assert said in " ".join(capsys.readouterr().err.split()), said

"""What ``skyhop bundle`` takes from a fleet home for each role, and what it refuses
(no wheels here: tests/integration/test_bundle.py builds and installs whole bundles)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from edge_agent.config import load as load_agent
from skyhop.compat import tomllib
from skyhop.deploy.bundle import PRIVATE, Node, node_files, sha256sums
from skyhop.errors import ConfigError
from skyhop.home import Home
from skyhop.models import load_catalog
from skyhop.security.pki import Pki

NOW = dt.datetime.now(dt.timezone.utc)


def _files(home: Home, node: Node) -> dict[str, bytes]:
    return {f.path: f.data for f in node_files(home, node, NOW)}


def test_an_edge_node_gets_its_config_models_worker_key_and_own_certificate(
    home: Home, tmp_path: Path
) -> None:
    files = node_files(home, Node("cam-7", "edge", ("digits",), "mqtts://mq:8883"), NOW)
    by_path = {f.path: f for f in files}
    assert {p for p, f in by_path.items() if f.mode == PRIVATE} == {
        next(p for p in by_path if p.startswith("home/keys/worker-")), "home/pki/cam-7.key"}
    # The device reads them as the agent will: node, role and models from the config.
    device = tmp_path / "device"
    for f in files:
        (device / f.path).parent.mkdir(parents=True, exist_ok=True)
        (device / f.path).write_bytes(f.data)
    installed = Home(device / "home")
    agent = load_agent(installed)
    assert (agent.node_id, agent.role, agent.models) == ("cam-7", "edge", ["digits"])
    assert installed.config().identity == "cam-7"
    assert installed.catalog().names == ("digits",)
    assert installed.worker_keys(NOW.timestamp()).active  # opens requests
    assert installed.tls("mqtts://mq:8883", "cam-7") is not None
    assert load_catalog(device / "home" / "catalog.toml").get("digits").example() is not None


def test_a_client_gets_no_worker_key_and_no_model(home: Home) -> None:
    files = _files(home, Node("app-1", "client", ("digits",), "mqtts://mq:8883"))
    assert not [p for p in files if p.startswith(("home/keys/worker-", "home/models/"))]
    assert "home/pki/app-1.key" in files
    assert "agent" not in tomllib.loads(files["home/config.toml"].decode())


def test_nothing_but_the_node_s_own_secret_leaves_the_home(home: Home) -> None:
    Pki(home.path).issue("cam-8", "edge")
    blob = b"".join(_files(home, Node("cam-7", "edge", ("digits",), "mqtt://mq")).values())
    for secret in ("ca.key", "cam-8.key"):
        assert (home.path / "pki" / secret).read_bytes() not in blob


def test_a_node_keeps_its_role(home: Home) -> None:
    node_files(home, Node("cam-7", "edge", ("digits",), "mqtt://mq"), NOW)
    with pytest.raises(ConfigError, match="holds a certificate for role edge"):
        node_files(home, Node("cam-7", "cloud", ("digits",), "mqtt://mq"), NOW)


def test_a_home_without_a_fleet_key_says_to_init_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="skyhop init"):
        node_files(Home(tmp_path / "nothing"), Node("cam-7", "edge", ("digits",), "mqtt://mq"),
                   NOW)


def test_mqtts_without_a_ca_says_to_make_one(tmp_path: Path) -> None:
    h = Home(tmp_path / "bare")
    h.init()
    with pytest.raises(ConfigError, match="skyhop certs init"):
        node_files(h, Node("cam-7", "edge", ("digits",), "mqtts://mq:8883"), NOW)
    assert "home/pki/ca.crt" not in _files(h, Node("cam-7", "edge", ("digits",), "mqtt://mq"))


@pytest.mark.parametrize("bad", [Node("cam 7", "edge", ("digits",), "mqtt://mq"),
                                 Node("cam-7", "broker", ("digits",), "mqtt://mq"),
                                 Node("cam-7", "edge", ("nope",), "mqtt://mq")])
def test_a_bad_node_is_refused(home: Home, bad: Node) -> None:
    with pytest.raises(ConfigError):
        node_files(home, bad, NOW)


def test_sha256sums_cover_every_file_in_sha256sum_format(home: Home) -> None:
    files = node_files(home, Node("cam-7", "edge", ("digits",), "mqtt://mq"), NOW)
    lines = sha256sums(files).data.decode().splitlines()
    assert len(lines) == len(files)
    assert all(len(h) == 64 and sep == "" for h, sep, _ in (ln.split(" ", 2) for ln in lines))

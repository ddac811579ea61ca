"""SLAs as an operator manages them: set, list, get and clear through the CLI against a
live broker; signatures checked at the broker over mqtts; a budget above the SLA capped;
every change in the audit trail."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from skyhop.client import Client
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import free_port
from skyhop.mqtt.bus import Bus
from skyhop.protocol.messages import SlaConfig
from skyhop.protocol.topics import Topics
from tests.integration.fleet import make_home
from tests.integration.test_cli import skyhop
from tests.integration.test_e2e import metric

pytestmark = pytest.mark.integration
SAMPLES = np.load(Path(__file__).parents[1] / "vectors" / "digits_samples.npz")


@pytest.fixture(scope="module")
def stack(fleet_server, tmp_path_factory) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("sla")
    home = make_home(root)
    with (
        fleet_server(home, {"edge-1": "edge"}) as (url, server),
        LocalStack(home, url, root / "logs", server) as st,
    ):
        st.metrics_port = free_port()
        st.broker("--http-port", str(st.metrics_port), "--log-format", "json")
        st.agent("edge-1", ["digits"])
        st.wait_live(["edge-1"])
        yield st


def cli(stack: LocalStack, *args: str, check: bool = True):
    return skyhop(*args, "--mqtt", stack.mqtt_url, "--home", str(stack.home.path), check=check)


def wait_log(stack: LocalStack, text: str, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in (log := (stack.log_dir / "broker.log").read_text()):
        assert time.monotonic() < deadline, f"the broker never logged {text!r}"
        time.sleep(0.05)
    return log


def json_lines(stack: LocalStack, text: str) -> list[dict]:
    """The broker's log lines (it logs JSON here) whose message holds ``text``."""
    lines = (stack.log_dir / "broker.log").read_text().splitlines()
    return [doc for line in lines if line.startswith("{")
            if text in (doc := json.loads(line))["message"]]


def signed(stack: LocalStack) -> bool:
    return stack.mqtt_url.startswith("mqtts")


def test_set_list_get_and_clear(stack: LocalStack) -> None:
    assert "300 ms" in cli(stack, "sla", "set", "digits", "--budget-ms", "300").stdout
    signer = "operator" if signed(stack) else "unsigned"
    wait_log(stack, "SLA for digits: 300 ms")
    applied = json_lines(stack, "SLA for digits: 300 ms")[-1]
    assert applied["message"].endswith(f"(signed by {signer})") and applied["model"] == "digits"
    [row] = json.loads(cli(stack, "sla", "list", "--json").stdout)
    assert (row["model"], row["budget_ms"], row["signer"], row["applied"]) == (
        "digits", 300, signer, True)
    assert json.loads(cli(stack, "sla", "get", "digits").stdout)["budget_ms"] == 300
    cli(stack, "sla", "clear", "digits")
    wait_log(stack, f"SLA for digits cleared by {signer}")
    assert json.loads(cli(stack, "sla", "list", "--json").stdout) == []
    missing = cli(stack, "sla", "get", "digits", check=False)
    assert missing.returncode == 1 and "has no SLA" in missing.stderr


def test_set_refuses_a_model_not_in_the_catalog(stack: LocalStack) -> None:
    proc = cli(stack, "sla", "set", "nope", "--budget-ms", "50", check=False)
    assert proc.returncode == 1 and "unknown model 'nope'" in proc.stderr
    assert "digits" in proc.stderr  # names the models it knows


def test_a_budget_above_the_sla_is_capped_at_it(stack: LocalStack) -> None:
    cli(stack, "sla", "set", "digits", "--budget-ms", "2500")
    wait_log(stack, "SLA for digits: 2500 ms")
    home = stack.home
    with Client(stack.mqtt_url, home.fleet_public(), topics=Topics(home.config().prefix),
                client_id="client-1", tls=home.tls(stack.mqtt_url, "client-1"),
                trust=home.trust()) as client:
        client.infer("digits", {"image": SAMPLES["images"][:1]}, budget_ms=60_000)
        client.infer("digits", {"image": SAMPLES["images"][:1]}, budget_ms=100)
    assert metric(stack, 'skyhop_broker_budget_capped_total{model="digits"}') == 1
    cli(stack, "sla", "clear", "digits")


def test_an_unsigned_sla_is_ignored_counted_and_shown(stack: LocalStack) -> None:
    if not signed(stack):
        pytest.skip("a home without a fleet CA takes SLAs unsigned (docs/security.md)")
    topic = Topics(stack.home.config().prefix).sla("digits")
    unsigned = SlaConfig(model="digits", budget_ms=1, issued_at_ms=2**40).encode()
    with Bus(stack.mqtt_url, "operator", tls=stack.home.tls(stack.mqtt_url, "operator")) as bus:
        bus.publish(topic, unsigned, qos=1, retain=True)
        assert bus.flush(10)
    deadline = time.monotonic() + 10
    name = 'skyhop_broker_sla_rejected_total{reason="unsigned"}'
    while metric(stack, name) < 1:
        assert time.monotonic() < deadline, "the broker never counted the unsigned SLA"
        time.sleep(0.05)
    [row] = json.loads(cli(stack, "sla", "list", "--json").stdout)
    assert (row["applied"], row["why"]) == (False, "unsigned")
    assert "ignored the SLA" in (stack.log_dir / "broker.log").read_text()
    cli(stack, "sla", "clear", "digits")  # a signed clear replaces the retained fake


def test_every_change_is_in_an_intact_audit_trail(stack: LocalStack) -> None:
    cli(stack, "sla", "set", "digits", "--budget-ms", "700")
    wait_log(stack, "SLA for digits: 700 ms")
    home = ["--home", str(stack.home.path)]
    assert "intact" in skyhop("audit", "verify", *home).stdout
    entries = [json.loads(line) for line in
               skyhop("audit", "list", "--json", *home).stdout.splitlines()]
    # the CLI as the operator; over plain mqtt a broker names itself broker-<random>
    actions = {(e["actor"].split("-")[0], e["action"]) for e in entries}
    assert {("operator", "sla.set"), ("operator", "sla.clear"), ("broker", "sla.applied"),
            ("broker", "sla.cleared")} <= actions
    applied = [e for e in entries if e["action"] == "sla.applied"]
    assert applied[-1]["changed"]["budget_ms"] == 700
    assert skyhop("audit", "list", "--since", "1h", *home).stdout.count("sla.set") >= 3
    path = stack.home.path / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + lines[2:]))  # one line removed
    bad = skyhop("audit", "verify", *home, check=False)
    assert bad.returncode == 1 and "line 2" in bad.stderr

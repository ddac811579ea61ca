"""The local fleet harness itself: what benches and tests wait on must be this fleet."""

from __future__ import annotations

import pytest

from skyhop.dev.localstack import LocalStack
from skyhop.errors import ConfigError

from .fleet import make_home

pytestmark = pytest.mark.integration


def test_a_status_retained_by_an_earlier_fleets_broker_is_not_taken_for_this_one(
        mosquitto, tmp_path):
    home = make_home(tmp_path)
    with LocalStack(home, mosquitto.url, tmp_path / "logs-a") as first:
        first.broker("--log-level", "warning")
        first.agent("edge-1", ["digits"], "--log-level", "warning")
        first.wait_live(["edge-1"])
        first.kill("broker")  # its last status, edge-1 live, stays retained
    with LocalStack(home, mosquitto.url, tmp_path / "logs-b") as second:
        second.broker("--log-level", "warning")
        with pytest.raises(ConfigError, match="not live"):
            second.wait_live(["edge-1"], timeout=3)  # edge-1 left with the first fleet

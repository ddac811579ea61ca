"""The broker's HTTP port on a live fleet: /status, /metrics, the probes, and the status
page in a real browser (Debian's headless Chromium, driven by Playwright).

The screenshots are kept as test artifacts: ``$SKYHOP_ARTIFACTS``, else
``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from skyhop.client import Client
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import free_port
from skyhop.protocol.topics import Topics
from tests.integration.fleet import make_home

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
NODES = {"edge-1": "edge", "edge-2": "edge", "cloud-1": "cloud"}
ARTIFACTS = Path(os.environ.get("SKYHOP_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
CHROMIUM = os.environ.get("SKYHOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as root in a container, on a closed network (docs/operations.md).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def fleet(fleet_server, transport: str, tmp_path_factory) -> Iterator[tuple[LocalStack, str]]:
    if transport == "mqtt":
        pytest.skip("one transport is enough: the page reads the same /status over both")
    root = tmp_path_factory.mktemp("web")
    home = make_home(root)
    with fleet_server(home, NODES) as (url, server), \
            LocalStack(home, url, root / "logs", server) as st:
        port = free_port()
        st.broker("--http-port", str(port))
        for node, role in NODES.items():
            st.agent(node, ["digits"], role=role)
        st.wait_live(list(NODES))
        _load(st, 40)
        yield st, f"http://127.0.0.1:{port}"


def _load(stack: LocalStack, n: int) -> None:
    home = stack.home
    with Client(stack.mqtt_url, home.fleet_public(), topics=Topics(home.config().prefix),
                client_id="client-1", tls=home.tls(stack.mqtt_url, "client-1"),
                trust=home.trust()) as client:
        image = np.zeros((1, 64), np.float32)
        futures = [client.submit("digits", {"image": image}, budget_ms=5000) for _ in range(n)]
        for f in futures:
            f.result(timeout=30)


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def _status(base: str) -> dict[str, Any]:
    code, kind, body = _get(base + "/status")
    assert (code, kind) == (200, "application/json")
    return json.loads(body)


def test_status_json_shows_every_node_and_each_models_slo(fleet) -> None:
    _, base = fleet
    doc = _status(base)
    rows = {n["node"]: n for n in doc["nodes"]}
    assert set(NODES) <= set(rows)
    for node, role in NODES.items():
        row = rows[node]
        assert (row["role"], row["state"]) == (role, "live")
        assert row["probe"] and row["last_seen_s"] < 10 and "digits" in row["service_ms"]
    digits = next(m for m in doc["models"] if m["model"] == "digits")
    assert digits["last_1m"]["requests"] >= 40
    assert digits["last_1m"]["attainment"] == 1.0  # 5 s budgets for a sub-ms model
    assert digits["last_1m"]["edge"] + digits["last_1m"]["cloud"] >= 40
    assert any(p["p50_ms"] for p in digits["series"])
    assert doc["connected"] is True and doc["errors"]["last_10m"] == {}


def test_metrics_histograms_and_per_node_gauges_at_the_broker(fleet) -> None:
    _, base = fleet
    code, kind, body = _get(base + "/metrics")
    assert code == 200 and kind.startswith("text/plain")
    text = body.decode()
    assert "# HELP skyhop_broker_request_latency_seconds " in text
    assert 'skyhop_broker_request_latency_seconds_bucket{le="+Inf",model="digits",where=' in text
    assert 'skyhop_broker_slo_met_total{model="digits"}' in text
    for node, role in NODES.items():  # one scrape of the broker sees every node
        assert f'skyhop_broker_node_up{{node="{node}",role="{role}"}} 1.0' in text
        assert f'skyhop_broker_node_queue_depth{{node="{node}",role="{role}"}}' in text
    assert "_created" not in text


def test_probes_and_an_unknown_path(fleet) -> None:
    _, base = fleet
    assert _get(base + "/healthz")[0] == 200
    assert _get(base + "/readyz")[:1] == (200,)
    code, _, body = _get(base + "/nope")
    assert code == 404 and b"/status" in body


def test_the_page_in_a_browser_sees_the_fleet_and_a_killed_node(fleet) -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium at {CHROMIUM}: make test installs Debian's chromium")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    stack, base = fleet
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(base + "/")
        for node in NODES:
            expect(page.locator(f'tr[data-node="{node}"]')).to_have_attribute(
                "data-state", "live", timeout=15_000)
        expect(page.locator('article[data-model="digits"]')).to_contain_text("SLO 1 min")
        page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)

        killed = time.monotonic()
        stack.kill("edge-2")  # SIGKILL: the MQTT server publishes its will
        # Within the report interval (1 s polls) of the broker's knowing, and the broker
        # knows at the will; 15 s is slack for a loaded machine, not the expectation.
        expect(page.locator('tr[data-node="edge-2"]')).to_have_attribute(
            "data-state", "offline", timeout=15_000)
        seen_after = time.monotonic() - killed
        page.screenshot(path=str(ARTIFACTS / "status-page-node-down.png"), full_page=True)

        phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
        phone.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        phone.goto(base + "/")
        expect(phone.locator('tr[data-node="edge-1"]')).to_be_visible(timeout=15_000)
        overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        phone.screenshot(path=str(ARTIFACTS / "status-page-phone.png"), full_page=True)
        browser.close()
    assert problems == []
    assert overflow <= 0, f"the phone layout is {overflow}px wider than the screen"
    print(f"node shown offline {seen_after:.1f} s after its kill")

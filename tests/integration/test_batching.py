"""Dynamic batching on a real agent: real ONNX Runtime, real Mosquitto, sealed requests.

Requests sent at once queue at a one-slot CPU agent with batching turned on; those to
a model with a batch dimension run together, and each gets the answer it would have got
alone. Requests sent apart wait up to ``max_queue_delay_ms`` for company. A model with
fixed dimensions runs every request alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from skyhop.client import Client
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import free_port
from skyhop.protocol.topics import Topics
from tests.integration.fleet import SLOW_SIDE, add_wide_model, make_home
from tests.integration.test_e2e import metric

REQUESTS = 48
DELAY_MS = 100.0  # how long a request waits for others to batch with


@pytest.fixture(scope="module")
def fleet(fleet_server, tmp_path_factory) -> Iterator[tuple[LocalStack, Client, Path]]:
    root = tmp_path_factory.mktemp("batching")
    home = make_home(root)
    config = home.config_path.read_text()  # on a CPU batching is off unless asked for
    home.config_path.write_text(config.replace(
        "[agent]\n", f"[agent]\nbatching = true\nmax_queue_delay_ms = {DELAY_MS}\n"))
    wide = add_wide_model(home)
    with fleet_server(home, {"edge-1": "edge"}) as (url, server), \
            LocalStack(home, url, root / "logs", server) as st:
        st.broker()
        st.agent_port = free_port()
        st.agent("edge-1", ["wide", "slow"], "--metrics-port", str(st.agent_port),
                 "--concurrency", "1")
        st.wait_live(["edge-1"])
        with Client(url, home.fleet_public(), topics=Topics(home.config().prefix),
                    client_id="client-1", tls=home.tls(url, "client-1")) as client:
            yield st, client, wide


def _runs(st: LocalStack, model: str) -> float:
    return metric(st, f'skyhop_agent_runs_total{{model="{model}"}}', st.agent_port)


def test_queued_requests_batch_and_each_gets_its_own_answer(fleet) -> None:
    st, client, wide = fleet
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1 + i % 3, SLOW_SIDE)).astype(np.float32)
          for i in range(REQUESTS)]
    before = _runs(st, "wide")
    futures = [client.submit("wide", {"x": x}, budget_ms=30_000) for x in xs]
    results = [f.result(timeout=120) for f in futures]
    runs = _runs(st, "wide") - before
    alone = ort.InferenceSession(str(wide), providers=["CPUExecutionProvider"])
    for x, result in zip(xs, results, strict=True):
        want = alone.run(None, {"x": x})[0]
        assert result.outputs["y"].shape == want.shape
        np.testing.assert_allclose(result.outputs["y"], want, rtol=1e-4, atol=1e-4)
    assert runs < REQUESTS, f"{REQUESTS} requests queued at once ran in {runs} runs"


def test_a_model_without_a_batch_dimension_never_batches(fleet) -> None:
    st, client, _ = fleet
    before = _runs(st, "slow")
    x = np.ones((SLOW_SIDE, SLOW_SIDE), np.float32)
    futures = [client.submit("slow", {"x": x}, budget_ms=30_000) for _ in range(6)]
    for f in futures:
        f.result(timeout=120)
    assert _runs(st, "slow") - before == 6


def test_requests_sent_apart_wait_for_company(fleet) -> None:
    # One every 10 ms to a model that runs in a few: none would queue behind another,
    # so only the 100 ms wait for company batches them.
    st, client, _ = fleet
    before = _runs(st, "wide")
    x = np.ones((1, SLOW_SIDE), np.float32)
    futures = []
    for _ in range(20):
        futures.append(client.submit("wide", {"x": x}, budget_ms=30_000))
        time.sleep(0.01)
    for f in futures:
        f.result(timeout=120)
    runs = _runs(st, "wide") - before
    assert runs <= 10, f"20 requests 10 ms apart ran in {runs} runs"

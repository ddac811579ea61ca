"""The command line as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from skyhop.client import Client
from skyhop.dev.localstack import LocalStack
from skyhop.home import Home
from skyhop.protocol.messages import RequestHeader
from skyhop.protocol.topics import Topics
from tests.integration.fleet import make_home

pytestmark = pytest.mark.integration
SAMPLES = np.load(Path(__file__).parents[1] / "vectors" / "digits_samples.npz")


def skyhop(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "skyhop", *args], capture_output=True, text=True, timeout=60
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"skyhop {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def test_help_lists_every_command() -> None:
    out = skyhop("--help").stdout
    for command in ("init", "broker", "agent", "check", "infer", "models", "sla", "status",
                    "demo"):
        assert command in out
    assert "--models" in skyhop("agent", "--help").stdout


def test_init_and_models(tmp_path: Path) -> None:
    out = skyhop("init", "--home", str(tmp_path / "h")).stdout
    assert "fleet key id" in out and (tmp_path / "h" / "keys" / "fleet.json").exists()
    again = skyhop("init", "--home", str(tmp_path / "h"), check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    assert "digits" in skyhop("models", "list", "--home", str(tmp_path / "h")).stdout
    path = skyhop("models", "path", "digits", "--home", str(tmp_path / "h")).stdout.strip()
    assert path.endswith("digits.onnx") and Path(path).is_file()
    bad = skyhop("models", "path", "nope", "--home", str(tmp_path / "h"), check=False)
    assert bad.returncode == 1 and "digits" in bad.stderr  # lists the known models


def test_bad_config_is_one_clear_line(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    home.init()
    (home.path / "config.toml").write_text("[broker]\npolicy = 'fastest'\n")
    proc = skyhop("broker", "--home", str(home.path), check=False)
    assert proc.returncode == 1
    assert "broker.policy" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def stack(fleet_server, tmp_path_factory) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("cli")
    home = make_home(root)
    with (
        fleet_server(home, {"edge-1": "edge"}) as (url, server),
        LocalStack(home, url, root / "logs", server) as st,
    ):
        st.broker()
        st.agent("edge-1", ["digits"])
        st.wait_live(["edge-1"])
        yield st


def test_infer_writes_the_prediction(stack: LocalStack, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", SAMPLES["images"][:4])
    common = ["--mqtt", stack.mqtt_url, "--home", str(stack.home.path)]
    out = skyhop(
        "infer",
        "digits",
        "--input",
        str(tmp_path / "x.npy"),
        "--budget-ms",
        "1000",
        "--output",
        str(tmp_path / "y.npz"),
        *common,
    )
    assert out.stdout.startswith("OK digits on edge-1 (edge)")
    outputs = np.load(tmp_path / "y.npz")
    assert (outputs["label"] == SAMPLES["labels"][:4]).all()


def test_infer_exits_non_zero_with_the_error_code(stack: LocalStack, tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((1, 63), np.float32))
    common = ["--mqtt", stack.mqtt_url, "--home", str(stack.home.path)]
    proc = skyhop("infer", "digits", "--input", str(tmp_path / "bad.npy"), *common, check=False)
    assert proc.returncode == 2 and "BAD_REQUEST" in proc.stderr


def test_sla_and_status(stack: LocalStack) -> None:
    common = ["--mqtt", stack.mqtt_url, "--home", str(stack.home.path)]
    assert "25 ms" in skyhop("sla", "set", "digits", "--budget-ms", "25", *common).stdout
    out = skyhop("status", *common).stdout
    assert "edge-1" in out and "deadline" in out


def test_requests_take_the_model_sla(stack: LocalStack) -> None:
    """Without a budget or priority, a client seals the model's published SLA into the
    header (which the broker places by and the agent queues by); the caller's win."""
    common = ["--mqtt", stack.mqtt_url, "--home", str(stack.home.path)]
    skyhop("sla", "set", "digits", "--budget-ms", "900", "--priority", "6", *common)
    home = stack.home
    with Client(stack.mqtt_url, home.fleet_public(), topics=Topics(home.config().prefix),
                client_id="client-1", tls=home.tls(stack.mqtt_url, "client-1")) as client:
        deadline = time.monotonic() + 10
        while getattr(client.sla.get("digits"), "priority", None) != 6:
            assert time.monotonic() < deadline, "the client never saw the retained SLA"
            time.sleep(0.05)
        sent: list[RequestHeader] = []
        send = client.send_sealed
        client.send_sealed = lambda h, e, k, **kw: (sent.append(h), send(h, e, k, **kw))[1]
        image = {"image": SAMPLES["images"][:1]}
        client.infer("digits", image)
        client.infer("digits", image, budget_ms=800, priority=1)
    assert (sent[0].budget_ms, sent[0].priority) == (900, 6)
    assert (sent[1].budget_ms, sent[1].priority) == (800, 1)


def test_check_reports_what_an_agent_would_run_here(tmp_path: Path) -> None:
    import json

    home = str(tmp_path / "h")
    skyhop("init", "--home", home)
    out = skyhop("check", "--home", home).stdout  # default: the models on disk
    assert "telemetry    cpu on cpu" in out and "digits" in out
    assert "CPUExecutionProvider" in out
    proc = skyhop("check", "--home", home, "--models", "digits,ppocr-det", "--json",
                  check=False)
    assert proc.returncode == 1  # ppocr-det was never fetched into this home
    report = json.loads(proc.stdout)
    digits, det = report["models"]
    assert report["ok"] is False and report["probe"]["kind"] == "cpu"
    assert digits["provider"] == "CPUExecutionProvider" and digits["run_ms"] > 0
    assert not digits["error"] and "skyhop models fetch ppocr-det" in det["error"]

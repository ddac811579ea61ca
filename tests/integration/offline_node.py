"""Install a node's bundle and serve requests with no network: run inside ``unshare -n``.

    unshare -n python -m tests.integration.offline_node FLEET_HOME BUNDLE PREFIX NODE PY \
        [CLIENT_BUNDLE]

Brings loopback up (the only interface a new namespace has), extracts BUNDLE, runs its
install.sh with PY, starts a mutual-TLS Mosquitto and a broker from FLEET_HOME, then
the installed agent as ``PREFIX/bin/skyhop agent --home PREFIX/home --mqtt URL``, and
sends the digits samples. With CLIENT_BUNDLE, that bundle is installed too and its
``skyhop infer`` sends one more. Prints one JSON line: timings, and the labels it got
and expected. test_bundle.py runs it; any failure is an exception and a non-zero exit.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from skyhop.client import Client
from skyhop.dev.mosquitto import TlsMosquitto
from skyhop.errors import RemoteError
from skyhop.home import Home
from skyhop.protocol.topics import Topics
from tests.integration.fleet import install_bundle, wait_for_birth

SAMPLES = Path(__file__).resolve().parents[1] / "vectors" / "digits_samples.npz"
BIRTH_S = 120.0  # the agent's start on a loaded 2-core machine is seconds; generous


def offline() -> bool:
    """True when nothing but loopback is reachable (a route out would fail the test)."""
    try:
        socket.create_connection(("1.1.1.1", 443), timeout=2).close()
    except OSError:
        return True
    return False


def first_reply(client: Client, image: np.ndarray) -> None:
    """Ask until the fleet answers: the broker subscribes seconds after its process starts."""
    deadline = time.monotonic() + BIRTH_S
    while True:
        try:
            client.infer("digits", {"image": image[None]}, budget_ms=2_000)
            return
        except RemoteError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def client_infer(prefix: str, url: str, image: np.ndarray) -> str:
    """One request through an installed client bundle's ``skyhop infer``: its output."""
    sample = Path(tempfile.mkdtemp(prefix="sample-")) / "x.npy"
    np.save(sample, image[None])
    done = subprocess.run([f"{prefix}/bin/skyhop", "infer", "digits", "--home",
                           f"{prefix}/home", "--mqtt", url, "--input", str(sample)],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def main(fleet_dir: str, bundle: str, prefix: str, node: str, python: str,
         client_bundle: str | None = None) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    assert offline(), "this namespace reaches the network: run it under unshare -n"
    fleet = Home(fleet_dir)
    install_s = install_bundle(bundle, prefix, python)
    client_prefix = f"{prefix}-client"
    if client_bundle:
        install_bundle(client_bundle, client_prefix, python)
    topics = Topics(fleet.config().prefix)
    with TlsMosquitto.start(fleet.path, prefix=topics.prefix) as server:
        skyhop = [sys.executable, "-m", "skyhop"]
        broker = subprocess.Popen([*skyhop, "broker", "--home", fleet_dir, "--mqtt", server.url])
        started = time.monotonic()
        agent = subprocess.Popen([f"{prefix}/bin/skyhop", "agent", "--home", f"{prefix}/home",
                                  "--mqtt", server.url])
        try:
            birth = wait_for_birth(server.url, topics, node, BIRTH_S, agent,
                                   tls=fleet.tls(server.url, "operator"))
            birth_s = time.monotonic() - started
            with np.load(SAMPLES) as data:
                images, labels = data["images"][:8], data["labels"][:8]
            got = []
            with Client(server.url, fleet.fleet_public(), topics=topics, client_id="client",
                        tls=fleet.tls(server.url, "client"), trust=fleet.trust()) as client:
                first_reply(client, images[0])  # the broker may still be starting
                for image in images:
                    result = client.infer("digits", {"image": image[None]}, budget_ms=10_000)
                    assert result.header.node == node
                    got.append(int(result.outputs["label"][0]))
            client_said = client_infer(client_prefix, server.url, images[0]) \
                if client_bundle else ""
        finally:
            for proc in (agent, broker):
                proc.terminate()
                proc.wait(timeout=60)
    print(json.dumps({"install_s": round(install_s, 2), "birth_s": round(birth_s, 2),
                      "models": list(birth.models), "labels": got,
                      "expected": [int(x) for x in labels], "agent_exit": agent.returncode,
                      "client": client_said}))


if __name__ == "__main__":
    main(*sys.argv[1:])

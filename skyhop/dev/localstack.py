"""A whole fleet on one machine, as real processes: for the demo, tests and benches.

    with LocalStack(home, mqtt_url, log_dir) as stack:
        stack.broker()
        stack.agent("edge-1", ["digits"])
        stack.wait_live(["edge-1"])

Each broker and agent is its own ``python -m skyhop`` process (so killing one is a
real crash: its MQTT will fires), with its log in ``log_dir``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from skyhop.cli.status_view import StatusWatcher
from skyhop.dev.mosquitto import TlsMosquitto
from skyhop.errors import ConfigError
from skyhop.home import Home
from skyhop.mqtt.url import MqttUrl
from skyhop.process import agent_args, spawn, terminate


class LocalStack:
    def __init__(self, home: Home, mqtt_url: str, log_dir: Path,
                 server: TlsMosquitto | None = None) -> None:
        self.home = home
        self.mqtt_url = mqtt_url
        self.server = server  # told to apply the rights when an identity is issued here
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._watcher: StatusWatcher | None = None
        self._first_broker_at: float | None = None  # wall clock, Unix s

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        proc = self.procs[name] = spawn(args, self.log_dir / f"{name}.log")
        return proc

    def credentials(self, name: str, role: str) -> None:
        """Over mqtts, make sure ``name`` has a certificate with ``role`` in the home."""
        if not MqttUrl.parse(self.mqtt_url).tls:
            return
        from skyhop.security.pki import Pki

        pki = Pki(self.home.path)
        if not pki.cert_path(name).exists():
            pki.issue(name, role)
            if self.server is not None:
                self.server.refresh()  # its rights are in force when this returns

    def broker(self, *extra: str, mqtt_url: str | None = None,
               name: str = "broker") -> subprocess.Popen[bytes]:
        """A broker called ``name`` (its certificate over mqtts; its log, NAME.log)."""
        self.credentials(name, "broker")
        if self._first_broker_at is None:
            self._first_broker_at = time.time()
        return self._spawn(
            name,
            ["broker", "--mqtt", mqtt_url or self.mqtt_url, "--home", str(self.home.path),
             "--identity", name, *extra],
        )

    def agent(
        self,
        node_id: str,
        models: list[str],
        *extra: str,
        role: str = "edge",
        mqtt_url: str | None = None,
    ) -> subprocess.Popen[bytes]:
        self.credentials(node_id, role)
        url = mqtt_url or self.mqtt_url
        return self._spawn(node_id, agent_args(self.home, url, node_id, models, role, *extra))

    def watcher(self) -> StatusWatcher:
        if self._watcher is None:
            self.credentials("monitor", "operator")  # "operator" is left to the CLI tools
            tls = self.home.tls(self.mqtt_url, "monitor")
            self._watcher = StatusWatcher(self.mqtt_url, self.home.config().prefix, tls).start()
        return self._watcher

    def wait_live(self, nodes: list[str], timeout: float = 60.0) -> None:
        """Block until a broker of this stack reports every node in ``nodes`` live with
        telemetry. A status retained by a broker of an earlier stack on the same server
        is older than this stack's first broker: it says nothing about this one."""
        deadline = time.monotonic() + timeout
        watcher = self.watcher()
        while time.monotonic() < deadline:
            self._check_alive()
            status = watcher.latest or {}
            if self._first_broker_at and status.get("time", 0) < self._first_broker_at:
                status = {}
            live = {n["node"] for n in status.get("nodes", []) if n["live"] and n["service_ms"]}
            if set(nodes) <= live:
                return
            time.sleep(0.1)
        raise ConfigError(
            f"nodes {sorted(set(nodes))} not live after {timeout:.0f} s; "
            f"see the logs in {self.log_dir}"
        )

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise ConfigError(f"{name} exited with {proc.returncode}:\n{tail}")

    def kill(self, name: str) -> None:
        """SIGKILL: a crash, not a shutdown (the server publishes the node's will)."""
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        if self._watcher:
            self._watcher.stop()
            self._watcher = None
        terminate(self.procs.values(), grace_s=10)
        self.procs.clear()

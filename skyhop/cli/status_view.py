"""Render the broker's retained status as a table (``skyhop status``, ``skyhop demo``)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from skyhop.errors import TransportError
from skyhop.mqtt.bus import Bus
from skyhop.mqtt.message import Message
from skyhop.mqtt.url import TlsFiles
from skyhop.protocol.messages import unpackb
from skyhop.protocol.topics import Topics


def status_table(status: dict[str, Any], title: str = "skyhop fleet") -> Table:
    """The fleet in at most 80 columns, one line per node: long node and device names
    are cut with an ellipsis. ``svc`` is the node's slowest model (each model's is on
    the status page and in ``/status``)."""
    table = Table(title=title, caption=caption(status), box=None, padding=(0, 1, 0, 0),
                  caption_justify="left", header_style="bold")
    table.add_column("node", no_wrap=True, max_width=12, min_width=4)
    table.add_column("role", no_wrap=True, min_width=4)
    table.add_column("state", no_wrap=True, min_width=5)
    table.add_column("device", no_wrap=True, max_width=10, min_width=6)
    for name in ("q/run", "util", "memory", "rtt", "svc", "placed"):
        table.add_column(name, no_wrap=True, justify="right", min_width=len(name))
    for n in status.get("nodes", []):
        state = node_state(n)
        table.add_row(
            n["node"], n["role"], "[red]offline[/red]" if state == "offline" else state,
            n["gpu"], f"{n['queue']}/{n['in_flight']}", f"{n['gpu_util']:.0%}",
            memory_text(n.get("mem_mb")), f"{n['rtt_ms']:.1f}", service_text(n),
            str(n["placements"]),
        )
    return table


# A broker republishes its retained status every status_interval_s (1 s by default); the
# document stays retained after the last broker stops, so an old one means nobody writes.
STALE_S = 10.0


def staleness(status: dict[str, Any], now: float | None = None) -> str | None:
    """A warning when the status is older than ``STALE_S`` by this machine's clock."""
    at = status.get("time")
    age = (time.time() if now is None else now) - at if at else 0.0
    if age <= STALE_S:
        return None
    return (f"STALE: this status is {age:.0f} s old; no broker has published since "
            "(is `skyhop broker` running on this MQTT server?)")


def caption(status: dict[str, Any]) -> str:
    lat = status.get("latency_ms", {})
    placed = " ".join(f"{k} {v}" for k, v in sorted(status.get("placements", {}).items()))
    lines = [f"policy {status.get('policy')}  pending {status.get('pending', 0)}  "
             f"p50 {lat.get('p50', 0):.1f} ms  p99 {lat.get('p99', 0):.1f} ms",
             f"placed {placed or 'none yet'}", "rtt and svc in ms"]
    if (stale := staleness(status)) is not None:
        lines.insert(0, stale)
    pool = status.get("pool")
    if pool:
        lines.append(f"pool ({pool.get('backend', '?')}) {pool['ready']} ready + "
                     f"{pool['starting']} starting, target {pool['target']} "
                     f"({pool['min_size']}-{pool['max_size']}, {pool['policy']})")
        workers = ", ".join(f"{w['node']} {w.get('state', 'ready' if w['ready'] else '?')}"
                            for w in pool.get("workers", []))
        if workers:
            lines.append(f"workers {workers}")
    return "\n".join(lines)


def status_lines(status: dict[str, Any]) -> list[str]:
    """The same view as plain, greppable lines, for a log or a pipe (not a terminal)."""
    at = status.get("time")
    stamp = dt.datetime.fromtimestamp(at, dt.timezone.utc).strftime("%H:%M:%S") if at else "-"
    lines = [f"{stamp} fleet {line}" for line in caption(status).splitlines()]
    for n in status.get("nodes", []):
        lines.append(
            f"{stamp} node {n['node']} role={n['role']} state={node_state(n)} "
            f"device={n['gpu']} queue={n['queue']} run={n['in_flight']} "
            f"util={n['gpu_util']:.0%} memory={memory_text(n.get('mem_mb'))} "
            f"rtt_ms={n['rtt_ms']:.1f} svc_ms={service_text(n)} placed={n['placements']}")
    return lines


def node_state(n: dict[str, Any]) -> str:
    return n.get("state") or (("draining" if n.get("draining") else "live") if n["live"]
                              else "offline")


def service_text(n: dict[str, Any]) -> str:
    times = n.get("service_ms") or {}
    return f"{max(times.values()):.1f}" if times else "-"


def memory_text(mem_mb: Sequence[float] | None) -> str:
    """``12.3/141G`` from [used, total] MiB (GiB); '-' before a node's first load
    report (or from a broker that predates the field)."""
    if not mem_mb or not mem_mb[1]:
        return "-"
    used, total = (x / 1024 for x in mem_mb)
    return f"{used:.{0 if used >= 100 else 1}f}/{total:.0f}G"


class StatusWatcher:
    """Keeps the latest ``broker/status`` document from the MQTT server."""

    def __init__(self, mqtt_url: str, prefix: str, tls: TlsFiles | None = None) -> None:
        self.latest: dict[str, Any] | None = None
        self.arrived = threading.Event()
        # Over mqtts the server forces the client id to the certificate's CN anyway.
        self._bus = Bus(mqtt_url, f"skyhop-status-{threading.get_ident()}", tls=tls)
        self._bus.subscribe(Topics(prefix).broker_status, self._on_status, qos=0)

    def start(self) -> StatusWatcher:
        self._bus.start()
        return self

    def stop(self) -> None:
        self._bus.stop()

    def _on_status(self, msg: Message) -> None:
        if msg.payload:
            self.latest = unpackb(msg.payload)
            self.arrived.set()


def show_status(
    mqtt_url: str, prefix: str, *, watch: bool = False, tls: TlsFiles | None = None
) -> None:
    watcher = StatusWatcher(mqtt_url, prefix, tls).start()
    try:
        if not watcher.arrived.wait(5.0):
            raise TransportError(
                "no broker/status within 5 s: is a broker running on this "
                "MQTT server (skyhop broker)?"
            )
        console = Console()
        if not watch:
            console.print(status_table(watcher.latest or {}))
            return
        if not console.is_terminal:
            _print_lines(watcher)
            return
        with Live(
            status_table(watcher.latest or {}), console=console, refresh_per_second=2
        ) as live:
            while True:
                watcher.arrived.wait(1.0)
                live.update(status_table(watcher.latest or {}))
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()


def _print_lines(watcher: StatusWatcher) -> None:
    """``status --watch`` into a pipe or file: each new status as plain lines."""
    while True:
        watcher.arrived.clear()
        print("\n".join(status_lines(watcher.latest or {})), flush=True)
        watcher.arrived.wait()

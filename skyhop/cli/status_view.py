"""Render the broker's retained status as a table (``skyhop status``, ``skyhop demo``)."""

from __future__ import annotations

import threading
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
    lat = status.get("latency_ms", {})
    caption = (
        f"policy {status.get('policy')}  pending {status.get('pending', 0)}  "
        f"p50 {lat.get('p50', 0):.1f} ms  p99 {lat.get('p99', 0):.1f} ms  "
        f"placements {status.get('placements', {})}"
    )
    pool = status.get("pool")
    if pool:
        caption += (
            f"\npool ({pool.get('backend', '?')}) {pool['ready']} ready + "
            f"{pool['starting']} starting, target {pool['target']} "
            f"({pool['min_size']}-{pool['max_size']}, {pool['policy']})"
        )
        workers = ", ".join(f"{w['node']} {w.get('state', 'ready' if w['ready'] else '?')}"
                            for w in pool.get("workers", []))
        caption += f"\nworkers {workers}" if workers else ""
    table = Table(title=title, caption=caption)
    table.add_column("node", no_wrap=True)  # the one column an operator greps for
    for name in ("role", "live", "device", "queue", "in flight", "util", "memory", "rtt ms"):
        table.add_column(name)
    table.add_column("service ms", overflow="fold")
    table.add_column("placed")
    for n in status.get("nodes", []):
        service = ", ".join(f"{m} {ms:.1f}" for m, ms in n.get("service_ms", {}).items())
        table.add_row(
            n["node"],
            n["role"],
            ("draining" if n.get("draining") else "yes") if n["live"] else "[red]no[/red]",
            n["gpu"],
            str(n["queue"]),
            str(n["in_flight"]),
            f"{n['gpu_util']:.0%}",
            memory_text(n.get("mem_mb")),
            f"{n['rtt_ms']:.1f}",
            service,
            str(n["placements"]),
        )
    return table


def memory_text(mem_mb: Sequence[float] | None) -> str:
    """``12.3/141.0 GiB`` from [used, total] MiB; '-' before a node's first load report
    (or from a broker that predates the field)."""
    if not mem_mb or not mem_mb[1]:
        return "-"
    used, total = (x / 1024 for x in mem_mb)
    return f"{used:.1f}/{total:.1f} GiB"


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

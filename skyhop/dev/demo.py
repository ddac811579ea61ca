"""``skyhop demo``: a local fleet under a mixed, open-loop load, with a live table.

Edge agents reach the MQTT server through a user-space delaying proxy (``netem.py``:
there is no kernel netem here) that stands for the WAN; the broker and the cloud
worker sit next to the server. Requests arrive as a Poisson process, mixed over the
models with each model's own budget, and each one ends in a result or a named error.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections import Counter
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from skyhop.cli.status_view import status_table
from skyhop.client import Client, Result
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import MosquittoProcess, TlsMosquitto
from skyhop.dev.netem import DelayProxy
from skyhop.errors import ConfigError, RemoteError
from skyhop.home import Home
from skyhop.logs import setup
from skyhop.models import Catalog, ModelEntry, fetch
from skyhop.mqtt.url import MqttUrl
from skyhop.stats import percentile

# Model mix: (model, share of requests). ppocr-cls needs a one-time fetch from PyPI.
MIX = (("digits", 0.7), ("ppocr-cls", 0.3))


@dataclass
class Outcome:
    model: str
    budget_ms: float
    code: str = "OK"
    latency_ms: float = 0.0
    where: str = ""


def _inputs(entry: ModelEntry, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for spec in entry.inputs:
        shape = [1 if isinstance(d, str) or d < 0 else d for d in spec.shape]
        out[spec.name] = (rng.random(shape) * 16).astype(spec.dtype)
    return out


def _models(home: Home, console: Console) -> list[tuple[str, float]]:
    catalog, mix = home.catalog(), []
    for name, share in MIX:
        try:
            with console.status(f"fetching {name}…"):
                fetch(catalog.get(name), home.models_dir)
            mix.append((name, share))
        except ConfigError as exc:
            console.print(f"[yellow]skipping {name}[/yellow]: {exc}")
    return mix


def _log_to(path: Path) -> None:
    """Library logs go to a file: the terminal belongs to the live table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    setup("info", os.environ.get("SKYHOP_LOG_FORMAT", "text"), path=path)


# Who the demo connects as over mqtts (agents get certificates named after their node id).
IDENTITIES = {"broker": "broker", "monitor": "operator", "demo-client": "client"}


def _issue(home: Home, identities: dict[str, str]) -> None:
    """A fleet CA and a certificate for each identity, all before the server starts."""
    from skyhop.security.pki import Pki

    pki = Pki(home.path)
    if not pki.ca_path.exists():
        pki.init()
    for name, role in identities.items():
        if not pki.cert_path(name).exists():
            pki.issue(name, role)


def run_demo(
    *,
    mqtt: str | None,
    duration: float,
    edges: int,
    rate: float,
    report: Path | None,
    wan_ms: float,
    home: Path | None,
    tls: bool = True,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """``log_dir`` (default: a new directory under the system's temp dir) keeps every
    process's log after the demo; the fleet's home and Mosquitto's files go with it."""
    console = Console()
    logs = log_dir or Path(tempfile.mkdtemp(prefix="skyhop-demo-logs-"))
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="skyhop-demo-")))
        _log_to(logs / "demo.log")
        h = Home(home or workdir / "home")
        if not (h.keys_dir / "fleet.json").exists():
            h.init()
        nodes = {f"edge-{i + 1}": "edge" for i in range(edges)} | {"cloud-1": "cloud"}
        server = None
        if mqtt is None:
            if tls:
                _issue(h, {**IDENTITIES, **nodes})
                server = stack.enter_context(TlsMosquitto.start(h.path, prefix=h.config().prefix))
                mqtt = server.url
            else:
                mqtt = stack.enter_context(MosquittoProcess.start(workdir=workdir / "mqtt")).url
        url = MqttUrl.parse(mqtt)
        wan = DelayProxy(url.host, url.port, delay_ms=wan_ms, bandwidth_mbps=100.0)
        wan.start()
        stack.callback(wan.stop)
        wan_url = f"{url.scheme}://127.0.0.1:{wan.port}"  # the edges' side of the WAN
        mix = _models(h, console)
        names = [m for m, _ in mix]
        fleet = stack.enter_context(LocalStack(h, mqtt, logs, server))
        fleet.broker()
        for node, role in nodes.items():
            fleet.agent(node, names, role=role, mqtt_url=wan_url if role == "edge" else mqtt)
        with console.status(f"starting broker and {len(nodes)} agents over {url.scheme}…"):
            fleet.wait_live(list(nodes), timeout=120)
        client = stack.enter_context(
            Client(mqtt, h.fleet_public(), client_id="demo-client", tls=h.tls(mqtt, "demo-client"))
        )
        outcomes = _drive(client, h.catalog(), mix, duration, rate, fleet, console)
        summary = summarize(outcomes)
        summary["wan_one_way_ms"] = wan_ms
        summary["transport"] = url.scheme
        console.print(status_table(fleet.watcher().latest or {}, "skyhop fleet (final)"))
    console.print_json(data=summary)
    for line in verdict(summary):
        console.print(line, highlight=False)
    if report:
        report.write_text(json.dumps(summary, indent=2) + "\n")
        console.print(f"report written to {report}")
    console.print(f"logs of every process kept in {logs}", highlight=False)
    return summary


def _drive(
    client: Client,
    catalog: Catalog,
    mix: list[tuple[str, float]],
    duration: float,
    rate: float,
    fleet: LocalStack,
    console: Console,
) -> list[Outcome]:
    """Open-loop Poisson arrivals for ``duration`` seconds; wait for every reply."""
    rng, nprng = random.Random(7), np.random.default_rng(7)
    inputs = {m: _inputs(catalog.get(m), nprng) for m, _ in mix}
    sent: list[tuple[Outcome, Future[Result]]] = []
    start = next_at = time.monotonic()
    next_line = start
    with Live(console=console, refresh_per_second=4,
              redirect_stdout=False) if console.is_terminal else ExitStack() as live:
        while (now := time.monotonic()) < start + duration:
            if now < next_at:
                time.sleep(min(next_at - now, 0.05))
            else:
                model = rng.choices([m for m, _ in mix], [w for _, w in mix])[0]
                budget = catalog.get(model).budget_ms
                sent.append(
                    (Outcome(model, budget), client.submit(model, inputs[model], budget_ms=budget))
                )
                next_at += rng.expovariate(rate)
            status = fleet.watcher().latest or {}
            progress = f"{now - start:5.1f}/{duration:.0f} s  sent {len(sent)}"
            if isinstance(live, Live):
                live.update(Group(status_table(status), Text(progress)))
            elif now >= next_line:  # a pipe or a log: a plain line every 5 s
                console.print(progress.strip(), highlight=False)
                next_line = now + 5
    for outcome, future in sent:
        try:
            result = future.result()
            outcome.latency_ms, outcome.where = result.latency_ms, result.header.where
        except RemoteError as exc:
            outcome.code = str(exc.code)
    return [o for o, _ in sent]


# What each refusal means, in the words a newcomer needs (docs/protocol.md §Errors).
WHY = {
    "INFEASIBLE": "the budget was below the best time the broker predicts on any node "
                  "that serves the model (its measured service time, queue and round "
                  "trip) on this machine",
    "DEADLINE_EXCEEDED": "placed in time but answered late: the nodes ran slower than "
                         "the service times they had reported (a busy machine)",
    "OVERLOADED": "every node that serves the model was full",
    "UNAVAILABLE": "no live node served the model then (starting, draining or lost)",
}
HEALTHY = 0.95  # of requests within budget: below this the verdict says what went wrong


def verdict(summary: dict[str, Any]) -> list[str]:
    """A few plain lines: was the run healthy, and if not, why (from the numbers)."""
    met = summary["slo_met_fraction"]
    lines = [f"verdict: {met:.0%} of {summary['requests']} requests met their budget"
             + (" — healthy." if met >= HEALTHY else ".")]
    for code, count in sorted(summary["errors"].items(), key=lambda kv: -kv[1]):
        share = count / max(1, summary["requests"])
        lines.append(f"  {code} {count} ({share:.0%}): {WHY.get(code, 'see the broker log')}")
    for model, m in summary["models"].items():
        if m["slo_met_fraction"] >= HEALTHY:
            continue
        p50 = m["latency_ms"]["p50"]
        cause = (f"its median latency ({p50:.0f} ms) is above its budget "
                 f"({m['budget_ms']:g} ms): this machine is too slow for it"
                 if p50 > m["budget_ms"] else "see the refusals above")
        lines.append(f"  {model} met its budget {m['slo_met_fraction']:.0%} of the time: "
                     f"{cause}. A real fleet runs it on a GPU; here, raise its budget "
                     f"(skyhop sla set {model} --budget-ms N) or run fewer agents.")
    return lines


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    ok = [o for o in outcomes if o.code == "OK"]
    met = sum(1 for o in ok if o.latency_ms <= o.budget_ms)
    lat = [o.latency_ms for o in ok]
    per_model: dict[str, Any] = {}
    for model in sorted({o.model for o in outcomes}):
        mine = [o for o in outcomes if o.model == model]
        mine_ok = [o.latency_ms for o in mine if o.code == "OK"]
        per_model[model] = {
            "requests": len(mine),
            "budget_ms": mine[0].budget_ms,
            "slo_met_fraction": sum(
                1 for o in mine if o.code == "OK" and o.latency_ms <= o.budget_ms
            )
            / len(mine),
            "latency_ms": {"p50": percentile(mine_ok, 50), "p99": percentile(mine_ok, 99)},
        }
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": dict(Counter(o.code for o in outcomes if o.code != "OK")),
        "slo_met_fraction": met / len(outcomes) if outcomes else 0.0,
        "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99)},
        "placements": {
            "edge": sum(o.where == "edge" for o in ok),
            "cloud": sum(o.where == "cloud" for o in ok),
        },
        "models": per_model,
    }

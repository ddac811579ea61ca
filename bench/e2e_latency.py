"""End-to-end latency of one sealed request through skyhop, against bare MQTT.

Every path runs in the same process, on the same private Mosquitto, in the same run,
interleaved in blocks so that a machine that slows down midway slows all of them:

- bare: a client publishes 1 KB with Response Topic + Correlation Data and an echo
  responder on another connection answers: client → server → responder → server →
  client, two passes through the MQTT server;
- relays: the same 1 KB through three responders that each only pass it on, four passes:
  the hops skyhop's path takes (client → broker → agent → broker → client), with no
  work at any of them; what the routed topology costs before skyhop does anything;
- skyhop: `Client.infer("digits")` → broker → agent (ONNX Runtime) → broker → client,
  with HPKE + ChaCha20-Poly1305 on the body.

Two cases: a quiet machine, and one with a CPU hog spinning on one core (the issue's
"one core busy"). The numbers to read are the ratios to bare in the same case, not the
milliseconds, which depend on the machine. Results: bench/results/e2e_latency.{json,md}.

    .venv/bin/python bench/e2e_latency.py [--requests 600] [--no-hog] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.synchronize
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from skyhop.client import Client
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import MosquittoProcess
from skyhop.home import Home
from skyhop.mqtt.bus import Bus
from skyhop.mqtt.message import Message
from skyhop.stats import percentile

BLOCK = 50  # round trips of one path before the next path's turn
WARM_UP = 30
RoundTrip = Callable[[], float]  # one request/response, its latency in ms


@contextmanager
def relay_chain(url: str, relays: int, name: str) -> Iterator[RoundTrip]:
    """Client → relay 1 → … → relay N → client, each relay a Bus that republishes what
    it gets, with the request's properties (response topic, correlation)."""
    done = threading.Event()
    got: list[float] = []
    with ExitStack() as stack:
        buses = [stack.enter_context(Bus(url, f"bench-{name}-{i}")) for i in range(relays)]
        for i, bus in enumerate(buses):
            onward = f"bench/{name}/{i + 1}" if i + 1 < relays else None
            bus.subscribe(f"bench/{name}/{i}", _relay(bus, onward))
        asker = stack.enter_context(Bus(url, f"bench-{name}-asker"))
        asker.subscribe(f"bench/{name}/reply", lambda m: (got.append(time.perf_counter()),
                                                          done.set()))
        payload, reply = bytes(1024), f"bench/{name}/reply"

        def one() -> float:
            done.clear()
            t0 = time.perf_counter()
            asker.publish(f"bench/{name}/0", payload, response_topic=reply,
                          correlation=b"0123456789abcdef0123456789abcdef")
            if not done.wait(5):
                raise TimeoutError(f"{name}: no reply in 5 s")
            return (got[-1] - t0) * 1000

        yield one


def _relay(bus: Bus, onward: str | None) -> Callable[[Message], None]:
    def relay(m: Message) -> None:
        bus.publish(onward or m.response_topic or "", m.payload,
                    response_topic=m.response_topic, correlation=m.correlation)
    return relay


def skyhop_path(client: Client) -> RoundTrip:
    x = {"image": np.zeros((1, 64), np.float32)}

    def one() -> float:
        t0 = time.perf_counter()
        client.infer("digits", x, budget_ms=1000)
        return (time.perf_counter() - t0) * 1000
    return one


def interleaved(paths: dict[str, RoundTrip], requests: int) -> dict[str, list[float]]:
    for one in paths.values():
        for _ in range(WARM_UP):  # link estimates, first-call allocations
            one()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(max(1, requests // BLOCK)):
        for name, one in paths.items():
            times[name] += [one() for _ in range(BLOCK)]
    return times


def _spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        sum(range(10_000))


@contextmanager
def cpu_hog(on: bool) -> Iterator[None]:
    """One process spinning: on this 2-core machine, one core busy."""
    if not on:
        yield
        return
    stop = multiprocessing.Event()
    hog = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
    hog.start()
    try:
        yield
    finally:
        stop.set()
        hog.join(5)


def summary(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(times, 50), 3), "p99_ms": round(percentile(times, 99), 3),
            "mean_ms": round(sum(times) / len(times), 3), "n": len(times)}


def skyhop_round_trips(home: Home, url: str, n: int) -> list[float]:
    """``n`` sequential round trips (bench/telemetry_flood.py compares two runs)."""
    with Client(url, home.fleet_public()) as client:
        one = skyhop_path(client)
        for _ in range(WARM_UP):
            one()
        return [one() for _ in range(n)]


def measure(home: Home, url: str, requests: int, hog: bool) -> dict[str, Any]:
    with ExitStack() as stack:
        client = stack.enter_context(Client(url, home.fleet_public()))
        paths = {"bare": stack.enter_context(relay_chain(url, 1, "bare")),
                 "relays": stack.enter_context(relay_chain(url, 3, "relays")),
                 "skyhop": skyhop_path(client)}
        with cpu_hog(hog):
            times = interleaved(paths, requests)
    result: dict[str, Any] = {name: summary(t) for name, t in times.items()}
    base = result["bare"]
    for name in ("relays", "skyhop"):
        s = result[name]
        result[f"{name}_ratio_p50"] = round(s["p50_ms"] / base["p50_ms"], 2)
        result[f"{name}_ratio_p99"] = round(s["p99_ms"] / base["p99_ms"], 2)
    return result


def markdown(result: dict[str, dict[str, Any]], requests: int) -> str:
    md = ["# End-to-end latency (sequential, loopback)", "",
          "| case | path | p50 ms | p99 ms | p50 ÷ bare | p99 ÷ bare |",
          "| --- | --- | --- | --- | --- | --- |"]
    labels = {"bare": "bare MQTT request/response (1 KB), 2 passes",
              "relays": "1 KB through 3 pass-through relays, 4 passes",
              "skyhop": "skyhop `digits`, sealed, via broker"}
    for case, r in result.items():
        for path, label in labels.items():
            s = r[path]
            ratio = (f"{r[f'{path}_ratio_p50']}× | {r[f'{path}_ratio_p99']}×"
                     if path != "bare" else "1× | 1×")
            md.append(f"| {case} | {label} | {s['p50_ms']} | {s['p99_ms']} | {ratio} |")
    md += ["", f"{requests} requests per path and case, interleaved in blocks of {BLOCK}, "
           "in the same run."]
    if "busy" in result:
        q, b = result["quiet"]["skyhop_ratio_p50"], result["busy"]["skyhop_ratio_p50"]
        md.append(f"With one core busy the p50 ratio is {b / q:.2f}× its quiet value.")
    return "\n".join([*md, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--no-hog", action="store_true", help="skip the one-core-busy case")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--providers", help="the agent's ONNX Runtime providers, e.g. cuda "
                        "(default: the agent's own choice, TensorRT > CUDA > CPU)")
    args = parser.parse_args()
    agent_extra = ["--providers", args.providers] if args.providers else []
    work = Path(tempfile.mkdtemp(prefix="skyhop-bench-"))
    home = Home(work / "home")
    home.init()
    cases = {"quiet": False} if args.no_hog else {"quiet": False, "busy": True}
    with MosquittoProcess.start() as server, LocalStack(home, server.url, work / "logs") as st:
        st.broker("--log-level", "warning")
        st.agent("edge-1", ["digits"], "--log-level", "warning", *agent_extra)
        st.wait_live(["edge-1"])
        result = {case: measure(home, server.url, args.requests, hog)
                  for case, hog in cases.items()}
    out = {"requests": args.requests, "block": BLOCK,
           "agent_providers": args.providers or "default", **result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e_latency.json").write_text(json.dumps(out, indent=2) + "\n")
    md = markdown(result, args.requests)
    (args.out / "e2e_latency.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

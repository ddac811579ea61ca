"""Throughput: the highest rate a fleet holds, against the wire, in the same run.

- **The wire**: a raw pipelined echo. Client processes publish 1 KB requests to one
  echo responder through Mosquitto, QoS 1 as skyhop's requests are, each with up to
  ``WINDOW`` unanswered, for ``--seconds``; the rate is the request/response pairs a
  second they all get.
- **The fleet**: ``--agents`` agents serving `digits` behind 1, 2 and 4 brokers on the
  shared subscription. Client processes send sealed requests open-loop (Poisson) at a
  rate that rises by ``STEP`` until a step fails: any error, or a p99 over the budget.
  Latency is counted from each request's scheduled send, so a client falling behind
  counts against the fleet (no coordinated omission). The highest rate that passed is
  what the fleet holds. Each fleet gets a Mosquitto of its own, so that nothing
  retained by the last one (its broker's status, say) fools the wait for this one.
- **The broker's CPU** per request: all brokers' user + system time (/proc) over a
  step, divided by the requests of that step.

Every process shares this machine's cores, clients and echo included, so the numbers
say how the parts compare here, not what a fleet of machines does.
Results: bench/results/throughput.{json,md}.

    .venv/bin/python bench/throughput.py [--seconds 5] [--agents 2] [--replicas 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from skyhop.client import Client, Result
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import MosquittoProcess
from skyhop.errors import RemoteError
from skyhop.home import Home
from skyhop.mqtt.bus import Bus
from skyhop.stats import percentile

WINDOW = 64  # unanswered echo requests per client process
STEP = 1.25  # each rate this much above the last
START_RATE = 100.0
CLIENTS = 2  # load processes
TICK = os.sysconf("SC_CLK_TCK")
# Spawned, not forked: the parent runs MQTT threads, which a fork would copy mid-flight.
MP = multiprocessing.get_context("spawn")


# -- the wire ---------------------------------------------------------------------------


def _echo_client(url: str, name: str, seconds: float, out: multiprocessing.Queue) -> None:
    window = threading.Semaphore(WINDOW)
    got = [0]
    with Bus(url, f"bench-{name}") as bus:
        def on_reply(_: object) -> None:
            got[0] += 1
            window.release()
        bus.subscribe(f"bench/echo/{name}", on_reply)
        payload, end = bytes(1024), time.monotonic() + seconds
        t0 = time.monotonic()
        while time.monotonic() < end:
            if window.acquire(timeout=1):
                bus.publish("bench/echo", payload, response_topic=f"bench/echo/{name}",
                            correlation=b"0123456789abcdef0123456789abcdef")
        out.put(got[0] / (time.monotonic() - t0))


def raw_echo(url: str, seconds: float) -> float:
    with Bus(url, "bench-echo") as echo:
        echo.subscribe("bench/echo", lambda m: echo.publish(
            m.response_topic or "", m.payload, correlation=m.correlation))
        out: multiprocessing.Queue = MP.Queue()
        procs = [MP.Process(target=_echo_client, args=(url, f"c{i}", seconds, out))
                 for i in range(CLIENTS)]
        for p in procs:
            p.start()
        rates = [out.get(timeout=seconds + 30) for _ in procs]
        for p in procs:
            p.join()
    return sum(rates)


# -- the fleet --------------------------------------------------------------------------


def _load_client(url: str, home: str, model: str, rate: float, seconds: float,
                 budget_ms: float, seed: int, out: multiprocessing.Queue) -> None:
    """Poisson arrivals at ``rate`` of ``model``'s catalog example; each request's
    (latency ms from its scheduled send, code, message)."""
    rng, x = random.Random(seed), Home(Path(home)).catalog().get(model).example()
    assert x is not None, f"{model} has no example input in the catalog"
    fates: list[tuple[float, str, str]] = []
    lock = threading.Lock()
    with Client(url, Home(Path(home)).fleet_public()) as client:
        futures: list[Future[Result]] = []
        t0 = time.monotonic()
        at = t0
        while at < t0 + seconds:
            time.sleep(max(0.0, at - time.monotonic()))
            f = client.submit(model, x, budget_ms=budget_ms)
            f.add_done_callback(_record(at, fates, lock))
            futures.append(f)
            at += rng.expovariate(rate)
        for f in futures:
            f.exception(timeout=budget_ms / 1000 + 5)
    out.put(fates)


def _record(at: float, fates: list[tuple[float, str, str]],
            lock: threading.Lock) -> Callable[[Future[Result]], None]:
    def record(f: Future[Result]) -> None:
        exc = f.exception()
        code = "OK" if exc is None else (str(exc.code) if isinstance(exc, RemoteError)
                                          else type(exc).__name__)
        why = exc.message if isinstance(exc, RemoteError) else ""
        with lock:
            fates.append(((time.monotonic() - at) * 1000, code, why))
    return record


def _cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def step(url: str, home: Home, rate: float, seconds: float, budget_ms: float,
         brokers: list[int], model: str = "digits") -> dict[str, float | int | bool]:
    """Open-loop load at ``rate`` for ``seconds``: what came back, and the brokers' CPU."""
    out: multiprocessing.Queue = MP.Queue()
    procs = [MP.Process(target=_load_client, args=(
        url, str(home.path), model, rate / CLIENTS, seconds, budget_ms, i, out))
        for i in range(CLIENTS)]
    cpu0 = _cpu_s(brokers)
    for p in procs:
        p.start()
    fates = [f for _ in procs for f in out.get(timeout=seconds + budget_ms / 1000 + 60)]
    for p in procs:
        p.join()
    cpu = _cpu_s(brokers) - cpu0
    ok = [ms for ms, code, _ in fates if code == "OK"]
    errors = len(fates) - len(ok)
    codes = Counter(code for _, code, _ in fates if code != "OK")
    why = {code: message for _, code, message in fates if code != "OK"}  # one of each
    p99 = percentile(ok, 99) if ok else float("inf")
    met = sum(1 for ms in ok if ms <= budget_ms)
    return {"rate": round(rate, 1), "requests": len(fates), "errors": errors,
            "slo_attainment": round(met / max(1, len(fates)), 4),
            "error_codes": dict(codes), "error_example": why,
            "p50_ms": round(percentile(ok, 50), 2) if ok else None, "p99_ms": round(p99, 2),
            "achieved_per_s": round(len(fates) / seconds, 1),
            "broker_cpu_ms_per_request": round(cpu * 1000 / max(1, len(fates)), 3),
            "passed": errors == 0 and p99 <= budget_ms}


def fleet(server: MosquittoProcess, home: Home, logs: Path, replicas: int, agents: int,
          seconds: float, budget_ms: float) -> dict[str, object]:
    with LocalStack(home, server.url, logs) as st:
        brokers = [st.broker("--log-level", "warning", name=f"broker-{i}").pid
                   for i in range(replicas)]
        nodes = [f"edge-{i}" for i in range(agents)]
        for node in nodes:
            st.agent(node, ["digits"], "--log-level", "warning")
        st.wait_live(nodes)
        steps, rate = [], START_RATE
        while True:
            s = step(server.url, home, rate, seconds, budget_ms, brokers)
            steps.append(s)
            print(f"  {replicas} broker(s), {rate:.0f}/s: {s}", flush=True)
            if not s["passed"]:
                break
            rate *= STEP
    held = [s for s in steps if s["passed"]]
    best = max(held, key=lambda s: float(s["rate"])) if held else None
    return {"replicas": replicas, "agents": agents, "steps": steps,
            "held_per_s": best["achieved_per_s"] if best else 0.0,
            "broker_cpu_ms_per_request": best["broker_cpu_ms_per_request"] if best else None}


def markdown(result: dict[str, Any]) -> str:
    echo = float(result["raw_echo_per_s"])
    md = ["# Throughput (loopback, every process on this machine)", "",
          f"Raw pipelined echo through Mosquitto, QoS 1: **{echo:.0f} pairs/s** "
          f"({CLIENTS} client processes, {WINDOW} unanswered each).", "",
          "| brokers | agents | held requests/s | ÷ raw echo | p99 at that rate ms | "
          "broker CPU ms/request |", "| --- | --- | --- | --- | --- | --- |"]
    for f in result["fleet"]:
        held = [s for s in f["steps"] if s["passed"]]
        p99 = held[-1]["p99_ms"] if held else "–"
        md.append(f"| {f['replicas']} | {f['agents']} | {f['held_per_s']:.0f} | "
                  f"{f['held_per_s'] / echo:.2f}× | {p99} | {f['broker_cpu_ms_per_request']} |")
    md += ["", f"Sealed `digits`, budget {result['budget_ms']} ms, open-loop Poisson from "
           f"{CLIENTS} client processes, {result['seconds']} s per rate, rates rising "
           f"{STEP}× from {START_RATE:.0f}/s until an error or a p99 over the budget.", ""]
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per rate step")
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--budget-ms", type=float, default=200.0)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="skyhop-throughput-"))
    home = Home(work / "home")
    home.init()
    with MosquittoProcess.start() as server:
        echo = raw_echo(server.url, args.seconds)
    print(f"raw echo: {echo:.0f} pairs/s", flush=True)
    runs = []
    for n in args.replicas:  # a fresh server each: no retained state from the last fleet
        with MosquittoProcess.start() as server:
            runs.append(fleet(server, home, work / f"logs-{n}", n, args.agents, args.seconds,
                              args.budget_ms))
    result = {"raw_echo_per_s": round(echo, 1), "budget_ms": args.budget_ms,
              "seconds": args.seconds, "clients": CLIENTS, "fleet": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "throughput.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

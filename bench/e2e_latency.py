"""End-to-end latency of one sealed request through skyhop, against bare MQTT.

Both run in the same process, on the same private Mosquitto, in the same run:

- baseline: a client publishes 1 KB with Response Topic + Correlation Data and an echo
  responder on another connection answers: client → server → responder → server → client;
- skyhop: `Client.infer("digits")` → broker → agent (ONNX Runtime) → broker → client,
  with HPKE + ChaCha20-Poly1305 on the body: 2 hops each way through the server.

The number to read is the ratio (skyhop / baseline), not the milliseconds, which
depend on the machine. Results go to bench/results/e2e_latency.{json,md}.

    .venv/bin/python bench/e2e_latency.py [--requests 500] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from skyhop.client import Client
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import MosquittoProcess
from skyhop.home import Home
from skyhop.mqtt.bus import Bus
from skyhop.mqtt.message import Message
from skyhop.stats import percentile


def bare_mqtt(url: str, n: int) -> list[float]:
    done = threading.Event()
    times: list[float] = []
    sent = [0.0]
    with Bus(url, "bench-echo") as echo, Bus(url, "bench-asker") as asker:
        echo.subscribe("bench/req", lambda m: echo.publish(
            m.response_topic or "", m.payload, correlation=m.correlation))

        def on_reply(m: Message) -> None:
            times.append((time.perf_counter() - sent[0]) * 1000)
            done.set()

        asker.subscribe("bench/reply", on_reply)
        payload = bytes(1024)
        for i in range(n):
            done.clear()
            sent[0] = time.perf_counter()
            asker.publish("bench/req", payload, response_topic="bench/reply",
                          correlation=str(i).encode())
            done.wait(5)
    return times


def skyhop_round_trips(home: Home, url: str, n: int) -> list[float]:
    x = {"image": np.zeros((1, 64), np.float32)}
    times = []
    with Client(url, home.fleet_public()) as client:
        for _ in range(20):  # warm-up: link estimates, first-call allocations
            client.infer("digits", x, budget_ms=1000)
        for _ in range(n):
            t0 = time.perf_counter()
            client.infer("digits", x, budget_ms=1000)
            times.append((time.perf_counter() - t0) * 1000)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(times, 50), 3), "p99_ms": round(percentile(times, 99), 3),
            "mean_ms": round(sum(times) / len(times), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--providers", help="the agent's ONNX Runtime providers, e.g. cuda "
                        "(default: the agent's own choice, TensorRT > CUDA > CPU)")
    args = parser.parse_args()
    agent_extra = ["--providers", args.providers] if args.providers else []
    work = Path(tempfile.mkdtemp(prefix="skyhop-bench-"))
    home = Home(work / "home")
    home.init()
    with MosquittoProcess.start() as server, LocalStack(home, server.url, work / "logs") as st:
        st.broker("--log-level", "warning")
        st.agent("edge-1", ["digits"], "--log-level", "warning", *agent_extra)
        st.wait_live(["edge-1"])
        base = summary(bare_mqtt(server.url, args.requests))
        sky = summary(skyhop_round_trips(home, server.url, args.requests))
    result = {"requests": args.requests, "agent_providers": args.providers or "default",
              "bare_mqtt": base, "skyhop": sky,
              "ratio_p50": round(sky["p50_ms"] / base["p50_ms"], 2),
              "ratio_p99": round(sky["p99_ms"] / base["p99_ms"], 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# End-to-end latency (sequential, loopback)", "",
          "| path | p50 ms | p99 ms | mean ms |", "| --- | --- | --- | --- |",
          f"| bare MQTT request/response (1 KB) | {base['p50_ms']} | {base['p99_ms']} | "
          f"{base['mean_ms']} |",
          f"| skyhop `digits`, sealed, via broker | {sky['p50_ms']} | {sky['p99_ms']} | "
          f"{sky['mean_ms']} |", "",
          f"Ratio skyhop / bare MQTT: p50 {result['ratio_p50']}×, p99 {result['ratio_p99']}×.",
          f"{args.requests} requests each, measured in the same run.", ""]
    (args.out / "e2e_latency.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Request latency while one node floods its load topic, with and without `node_rate`.

A private Mosquitto (plain MQTT), a broker and one `digits` agent as processes; the
client sends sequential requests, first alone (the baseline), then while another
process, posing as a registered node that serves another model, publishes load reports
at a fixed rate. Each flood rate is run with the broker's `[broker] node_rate` off (0)
and at its default (20/s): every run has its own baseline, and the number to read is
the ratio to it. Results go to bench/results/telemetry_flood.{json,md}.

    .venv/bin/python bench/telemetry_flood.py [--rates 1000 3000] [--requests 600]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from e2e_latency import skyhop_round_trips, summary

from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import MosquittoProcess
from skyhop.home import Home

FLOODER = r"""
import sys, time
from skyhop.protocol.messages import LoadReport, ModelLoad, NodeStatus
from skyhop.mqtt.bus import Bus
from skyhop.protocol.topics import Topics

url, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
t = Topics()
with Bus(url, "chatty") as bus:
    bus.publish(t.status("chatty"), NodeStatus(node="chatty", online=True, session=1,
                models=("other",)).encode(), retain=True)
    start, n = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        ahead = n / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
        report = LoadReport(node="chatty", session=1, seq=n, queue=0, in_flight=0,
                            capacity=1, rtt_ms=1.0, gpu_util=0.0, probe="cpu",
                            models={"other": ModelLoad(5.0, 6.0, 10)})
        bus.publish(t.load("chatty"), report.encode(), qos=0)
        n += 1
"""


def one_run(rate: float, node_rate: float, requests: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="skyhop-flood-"))
    home = Home(work / "home")
    home.init()
    config = home.path / "config.toml"
    config.write_text(config.read_text().replace("node_rate = 20.0", f"node_rate = {node_rate}"))
    with MosquittoProcess.start() as server, LocalStack(home, server.url, work / "logs") as st:
        st.broker("--log-level", "warning")
        st.agent("edge-1", ["digits"], "--log-level", "warning")
        st.wait_live(["edge-1"])
        base = summary(skyhop_round_trips(home, server.url, requests))
        flooder = subprocess.Popen([sys.executable, "-c", FLOODER, server.url, str(rate), "600"])
        try:
            time.sleep(2)  # the flood is on before the first request
            flooded = summary(skyhop_round_trips(home, server.url, requests))
        finally:
            flooder.terminate()
            flooder.wait()
    return {"flood_per_s": rate, "node_rate": node_rate, "alone": base, "flooded": flooded,
            "ratio_p50": round(flooded["p50_ms"] / base["p50_ms"], 2),
            "ratio_p99": round(flooded["p99_ms"] / base["p99_ms"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[1000.0, 3000.0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    runs = []
    for rate in args.rates:
        for node_rate in (0.0, 20.0):
            runs.append(one_run(rate, node_rate, args.requests))
            print(json.dumps(runs[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "telemetry_flood.json").write_text(json.dumps(runs, indent=2) + "\n")
    md = ["# Request latency while one node floods its load topic", "",
          f"{args.requests} sequential `digits` requests alone, then during the flood, "
          "in the same run.", "",
          "| flood msg/s | node_rate | alone p50 / p99 ms | flooded p50 / p99 ms | "
          "ratio p50 | ratio p99 |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        a, f = r["alone"], r["flooded"]
        md.append(f"| {r['flood_per_s']:,.0f} | {r['node_rate'] or 'off'} | "
                  f"{a['p50_ms']} / {a['p99_ms']} | {f['p50_ms']} / {f['p99_ms']} | "
                  f"{r['ratio_p50']}× | {r['ratio_p99']}× |")
    (args.out / "telemetry_flood.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

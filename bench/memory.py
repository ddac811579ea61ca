"""Resident memory: an agent per catalog model, and a broker holding N nodes' telemetry.

- **Agent**: the process with the agent's code and ONNX Runtime imported and no model
  (``baseline``), then one agent per catalog model, each live (its birth and load seen
  by a broker), read from /proc/PID/status (VmRSS).
- **Broker**: one broker, then a publisher process that announces ``N`` nodes (a
  retained status each) and sends each a load report every 1 s (1,000 nodes) or 4 s
  (10,000: within the broker's 5 s node timeout, at 2,500 reports/s), for 1,000 and
  for 10,000 nodes; the broker's RSS once its fleet view holds them all, against the same
  broker before the publisher started.

Results: bench/results/memory.{json,md}.

    .venv/bin/python bench/memory.py [--nodes 1000 10000] [--models digits ppocr-rec]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import MosquittoProcess
from skyhop.home import Home

BASELINE = r"""
import edge_agent.builder, edge_agent.agent, onnxruntime
from pathlib import Path
rss = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS")]
print(int(rss[0].split()[1]))
"""

PUBLISHER = r"""
import sys, time
from skyhop.protocol.messages import LoadReport, ModelLoad, NodeStatus
from skyhop.mqtt.bus import Bus
from skyhop.protocol.topics import Topics

url, n, seconds, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
t = Topics()
nodes = [f"sim-{i:05d}" for i in range(n)]
with Bus(url, "memory-bench") as bus:
    for node in nodes:
        bus.publish(t.status(node), NodeStatus(node=node, online=True, session=1,
                    models=("digits",)).encode(), retain=True)
    start, seq = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        for node in nodes:
            bus.publish(t.load(node), LoadReport(
                node=node, session=1, seq=seq, queue=0, in_flight=0, capacity=1,
                rtt_ms=5.0, gpu_util=0.1, probe="cpu",
                models={"digits": ModelLoad(1.0, 2.0, 10)}).encode(), qos=0)
        seq += 1
        time.sleep(max(0.0, start + seq * every - time.monotonic()))
    for node in nodes:  # leave no retained births for the next run
        bus.publish(t.status(node), b"", retain=True)
    bus.flush(30)
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def agents(models: list[str], work: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                         check=True)
    result = {"baseline (agent code + onnxruntime, no model)": int(out.stdout) / 1024}
    home = Home(work / "agents")
    home.init()
    with MosquittoProcess.start() as server:
        for model in models:
            with LocalStack(home, server.url, work / f"logs-{model}") as st:
                st.broker("--log-level", "warning")
                proc = st.agent("edge-1", [model], "--log-level", "warning")
                st.wait_live(["edge-1"], timeout=600)  # a first fetch of its wheel
                time.sleep(2)
                result[model] = rss_mb(proc.pid)
                print(f"agent with {model}: {result[model]:.1f} MB", flush=True)
    return result


def broker(nodes: int, work: Path) -> dict[str, float]:
    home = Home(work / f"broker-{nodes}")
    home.init()
    with MosquittoProcess.start() as server, LocalStack(home, server.url,
                                                          work / f"logs-{nodes}") as st:
        proc = st.broker("--log-level", "warning")
        watcher = st.watcher()
        time.sleep(3)
        before = rss_mb(proc.pid)
        seconds = 30 + nodes / 500  # long enough to announce them all, and report twice
        every = min(4.0, max(1.0, nodes / 2500))
        pub = subprocess.Popen([sys.executable, "-c", PUBLISHER, server.url, str(nodes),
                                str(seconds), str(every)])
        deadline, seen = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            status = watcher.latest or {}
            seen = sum(1 for n in status.get("nodes", []) if n["live"])
            if seen >= nodes:
                break
            time.sleep(1)
        time.sleep(5)  # a few rounds of reports after the last birth
        after = rss_mb(proc.pid)
        pub.wait(seconds + 60)
    print(f"broker with {nodes} nodes ({seen} seen live): {before:.1f} -> {after:.1f} MB",
          flush=True)
    return {"nodes": nodes, "seen_live": seen, "rss_mb_before": round(before, 1),
            "rss_mb_after": round(after, 1),
            "kb_per_node": round((after - before) * 1024 / nodes, 2)}


def markdown(result: dict[str, object]) -> str:
    md = ["# Resident memory", "", "| agent | RSS MB |", "| --- | --- |"]
    md += [f"| {name} | {mb:.1f} |" for name, mb in result["agent_rss_mb"].items()]  # type: ignore[attr-defined]
    md += ["", "| broker, nodes held | seen live | RSS before MB | RSS after MB | kB per node |",
           "| --- | --- | --- | --- | --- |"]
    md += [f"| {b['nodes']} | {b['seen_live']} | {b['rss_mb_before']} | {b['rss_mb_after']} | "
           f"{b['kb_per_node']} |" for b in result["broker"]]  # type: ignore[attr-defined]
    return "\n".join([*md, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--models", nargs="+",
                        default=["digits", "ppocr-det", "ppocr-rec", "ppocr-cls", "silero-vad"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="skyhop-memory-"))
    result = {"agent_rss_mb": {k: round(v, 1) for k, v in agents(args.models, work).items()},
              "broker": [broker(n, work) for n in args.nodes]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "memory.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

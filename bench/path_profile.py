"""Where a routed request's time goes, per hop and per step.

One client sends sealed `digits` requests one after another through a broker and an
agent, all on this machine, with every process stamping the functions a request passes
through (bench/tracing/skyhop_trace.py: a wall-clock stamp on entry and return, one
clock for all). Each request's stamps are lined up along the path below, and each step
is the time from one stamp to the next; the table gives each step's median over the
requests. The MQTT hops are from the sender's socket write returning to the receiver's
paho reading the packet: Mosquitto's forwarding, two kernels' loopback and the
receiver's wake-up.

The stamps cost a microsecond or so each, some 30 per request: the total here is a
little above bench/e2e_latency.py's. Results: bench/results/path_profile.{json,md}.

    .venv/bin/python bench/path_profile.py [--requests 500] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

TRACING = Path(__file__).parent / "tracing"
# (process, stamp, what the time from the previous stamp to this one was spent on)
PATH = [
    ("client", "infer>", ""),
    ("client", "seal<", "client: encode the tensors, seal (HPKE + ChaCha20-Poly1305)"),
    ("client", "publish>", "client: file the request, arm its deadline"),
    ("client", "sock_send>", "client: paho builds the packet, wakes its network thread"),
    ("client", "sock_send<", "client: socket write"),
    ("broker", "recv>", "MQTT hop 1: client → server → broker"),
    ("broker", "on_request>", "broker: paho reads the packet and its properties"),
    ("broker", "forward>", "broker: clear header, replay guard, placement"),
    ("broker", "publish>", "broker: the work's metadata"),
    ("broker", "on_request<", "broker: paho builds the packet; accounting"),
    ("broker", "sock_send>", "broker: back to paho's loop"),
    ("broker", "sock_send<", "broker: socket write"),
    ("agent", "recv>", "MQTT hop 2: broker → server → agent"),
    ("agent", "on_work>", "agent: paho reads the packet and its properties"),
    ("agent", "on_work<", "agent: clear header, stale check, queue"),
    ("agent", "run>", "agent: a worker thread wakes"),
    ("agent", "open<", "agent: open (HPKE + ChaCha20-Poly1305)"),
    ("agent", "ort>", "agent: replay guard, decode tensors, run log"),
    ("agent", "ort<", "agent: ONNX Runtime"),
    ("agent", "seal_reply<", "agent: metrics, encode and seal the reply"),
    ("agent", "publish>", "agent: reply header"),
    ("agent", "sock_send>", "agent: paho builds the packet, wakes its network thread"),
    ("agent", "sock_send<", "agent: socket write"),
    ("broker", "recv>", "MQTT hop 3: agent → server → broker"),
    ("broker", "on_reply>", "broker: paho reads the packet and its properties"),
    ("broker", "publish>", "broker: match the reply to its request"),
    ("broker", "on_reply<", "broker: paho builds the packet; metrics, outcomes"),
    ("broker", "sock_send>", "broker: back to paho's loop"),
    ("broker", "sock_send<", "broker: socket write"),
    ("client", "recv>", "MQTT hop 4: broker → server → client"),
    ("client", "on_reply>", "client: paho reads the packet and its properties"),
    ("client", "open_reply<", "client: open the reply (HKDF + ChaCha20-Poly1305)"),
    ("client", "infer<", "client: decode the tensors, wake the caller"),
]


def _group(label: str) -> str:
    return "MQTT hops" if label.startswith("MQTT") else label.split(":")[0]


def steps_of(stamps: list[tuple[int, str, str]]) -> list[list[float]]:
    """Per request, the µs of each step of PATH, from stamps sorted by time; requests
    whose stamps do not all appear (a telemetry publish in between is skipped over,
    a missing one drops the request) are left out."""
    starts = [i for i, s in enumerate(stamps) if s[1:] == ("client", "infer>")]
    runs = []
    for k, start in enumerate(starts):
        window = stamps[start:starts[k + 1] if k + 1 < len(starts) else len(stamps)]
        at, j, times = window[0][0], 0, []
        for process, stamp, _ in PATH[1:]:
            while j < len(window) and window[j][1:] != (process, stamp):
                j += 1
            if j == len(window):
                break
            times.append((window[j][0] - at) / 1000)
            at, j = window[j][0], j + 1
        if len(times) == len(PATH) - 1:
            runs.append(times)
    return runs


def profile(requests: int, work: Path) -> list[tuple[int, str, str]]:
    stamps_dir = work / "stamps"
    stamps_dir.mkdir()
    os.environ["SKYHOP_TRACE_DIR"] = str(stamps_dir)  # the broker and agent inherit it
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TRACING), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(TRACING))
    import skyhop_trace

    skyhop_trace.install(str(stamps_dir))
    from skyhop.client import Client
    from skyhop.dev.localstack import LocalStack
    from skyhop.dev.mosquitto import MosquittoProcess
    from skyhop.home import Home

    home = Home(work / "home")
    home.init()
    x = {"image": np.zeros((1, 64), np.float32)}
    with MosquittoProcess.start() as server, LocalStack(home, server.url, work / "logs") as st:
        st.broker("--log-level", "warning")
        st.agent("edge-1", ["digits"], "--log-level", "warning")
        st.wait_live(["edge-1"])
        with Client(server.url, home.fleet_public()) as client:
            for _ in range(30):  # warm-up, not counted
                client.infer("digits", x, budget_ms=1000)
            skyhop_trace.STAMPS.clear()
            for _ in range(requests):
                client.infer("digits", x, budget_ms=1000)
            ours = list(skyhop_trace.STAMPS)
    stamps = [(t, "client", s) for t, s in ours]
    for f in stamps_dir.glob("stamps-*.json"):
        d = json.loads(f.read_text())
        if d["role"] != "client":
            stamps += [(t, d["role"], s) for t, s in d["stamps"]]
    return sorted(stamps)


def report(runs: list[list[float]], requests: int) -> tuple[dict[str, object], str]:
    medians = [statistics.median(r[i] for r in runs) for i in range(len(PATH) - 1)]
    totals = [sum(r) for r in runs]
    labels = [label for _, _, label in PATH[1:]]
    groups: dict[str, float] = {}
    for label, us in zip(labels, medians, strict=True):
        groups[_group(label)] = groups.get(_group(label), 0.0) + us
    result: dict[str, object] = {
        "requests": requests, "complete": len(runs),
        "total_p50_us": round(statistics.median(totals), 1),
        "steps": [{"step": label, "p50_us": round(us, 1)}
                  for label, us in zip(labels, medians, strict=True)],
        "by_part_us": {k: round(v, 1) for k, v in groups.items()},
    }
    total = sum(medians)
    md = ["# Where the time goes: one sealed `digits` request, routed", "",
          "| step | p50 µs | share |", "| --- | --- | --- |"]
    md += [f"| {label} | {us:.0f} | {us / total:.0%} |"
           for label, us in zip(labels, medians, strict=True)]
    md += ["", "| part | µs | share |", "| --- | --- | --- |"]
    md += [f"| {k} | {v:.0f} | {v / total:.0%} |"
           for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
    md += ["", f"Median of {len(runs)} of {requests} sequential requests (the rest had a "
           f"stamp missing); end-to-end p50 {result['total_p50_us']} µs with the stamps on.", ""]
    return result, "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="skyhop-path-"))
    runs = steps_of(profile(args.requests, work))
    if not runs:
        raise SystemExit("no request had every stamp: did the broker and agent start with "
                         f"bench/tracing on PYTHONPATH? logs in {work / 'logs'}")
    result, md = report(runs, args.requests)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "path_profile.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "path_profile.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

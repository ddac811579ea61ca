"""Cost of one ``place()`` call at fleets of 100 to 100,000 nodes.

Each fleet has the built-in scenarios' mix (Jetson Nano, Orin NX, AGX Orin, desktop RTX
at 100 sites; an L4 pool of 1 % of the fleet, 2 to 100 workers), three models, and is
loaded before timing starts: every placed request is dispatched and a random earlier
one answered, so queues, backlogs and idle sets look like a fleet at work (about a
third of the nodes busy). Then ``--calls`` decisions are timed one by one with
``time.perf_counter_ns``, garbage collector on, as the live broker runs; each size is
measured ``--repeat`` times on a fresh fleet and the median of each statistic is kept
(one run's p99 moves by ±20 % with the garbage collector's timing).

    .venv/bin/python bench/placement_scale.py --out bench/results/placement_scale.json

Writes FILE.json as {"100": {"p50_us": …, "p99_us": …}, …} for the default policy
(``deadline``), and next to it FILE.md and FILE.png with every policy. The number to read
is the ratio between sizes, measured in one run; the microseconds depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from plotting import pyplot

from cloud_broker.fleet import Fleet
from cloud_broker.placement import POLICIES, Ask, PlacementState, place
from sim import load_scenario
from skyhop.protocol.messages import LoadReport, ModelLoad, NodeStatus
from skyhop.stats import percentile

SIZES = (100, 1_000, 10_000, 100_000)
NOW = 1_000_000.0


def build(n: int, rng: random.Random) -> tuple[Fleet, list]:
    spec = load_scenario("steady")
    fleet = Fleet(node_timeout_ms=1e12)
    cloud = max(2, min(100, n // 100))
    edges = n - cloud
    total = sum(e.count for e in spec.edges)
    net = spec.network
    sites = [(rng.uniform(*net.site_rtt_ms), rng.uniform(*net.site_bandwidth_mbps))
             for _ in range(100)]
    i = 0
    for e in spec.edges:
        for _ in range(round(edges * e.count / total)):
            rtt, _ = sites[i % 100]
            models = tuple(m.name for m in spec.models if e.speed >= m.min_speed)
            _node(fleet, f"edge-{i}", "edge", e.gpu, e.speed, 1, rtt, models, spec, rng)
            i += 1
    c = spec.cloud
    for j in range(cloud):
        _node(fleet, f"cloud-{j}", "cloud", c.gpu, c.speed, c.concurrency, c.rtt_ms,
              tuple(m.name for m in spec.models), spec, rng)
    return fleet, list(spec.models)


def _node(fleet: Fleet, name: str, role: str, gpu: str, speed: float, slots: int, rtt: float,
          models: tuple[str, ...], spec, rng: random.Random) -> None:
    fleet.on_status(NodeStatus(node=name, online=True, session=1, role=role, models=models,
                               gpu=gpu, concurrency=slots), NOW)
    stats = {m.name: ModelLoad(m.service_ms / speed, 1.4 * m.service_ms / speed, 50)
             for m in spec.models if m.name in models}
    fleet.on_load(LoadReport(node=name, session=1, seq=1, queue=0, in_flight=0, capacity=65,
                             rtt_ms=rtt, models=stats), NOW)


def asks(models: list, rng: random.Random, n: int) -> list[Ask]:
    weights = [300, 150, 80]  # the scenarios' mix of detect, ocr, caption
    out = []
    for _ in range(n):
        m = rng.choices(models, weights)[0]
        out.append(Ask(m.name, int(m.request_kb * 1000), m.budget_ms, m.priority,
                       origin=str(rng.randrange(64))))
    return out


def measure(n: int, policy: str, calls: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    fleet, models = build(n, rng)
    prng, state = random.Random(seed + 1), PlacementState()
    held: list[tuple[str, float]] = []
    keep = max(10, n // 3)  # about a third of the fleet busy
    timings = []
    for i, ask in enumerate(asks(models, rng, calls + calls // 4)):
        t0 = time.perf_counter_ns()
        d = place(fleet, ask, NOW, prng, policy=policy, state=state)
        elapsed = time.perf_counter_ns() - t0
        if i >= calls // 4:  # the first quarter warms the fleet up
            timings.append(elapsed / 1000)
        if d.node is not None:
            fleet.dispatched(d.node, NOW + ask.remaining_ms, d.service_ms)
            held.append((d.node, NOW + ask.remaining_ms))
        while len(held) > keep:
            node, deadline = held.pop(rng.randrange(len(held)))
            fleet.answered(node, deadline_ms=deadline)
    return {"p50_us": round(percentile(timings, 50), 2),
            "p99_us": round(percentile(timings, 99), 2),
            "mean_us": round(sum(timings) / len(timings), 2)}


def plot(results: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(7, 4))
    for policy, by_size in results.items():
        xs = [int(s) for s in by_size]
        ax.plot(xs, [v["p99_us"] for v in by_size.values()], marker="o", label=f"{policy} p99")
    ax.plot(list(map(int, results["deadline"])),
            [v["p50_us"] for v in results["deadline"].values()], "k--", marker=".",
            label="deadline p50")
    ax.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("nodes in the fleet")
    ax.set_ylabel("µs per place() call")
    ax.set_title("Placement cost against fleet size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict[str, dict[str, dict[str, float]]], calls: int, repeat: int) -> str:
    d = results["deadline"]
    lines = ["# place() cost against fleet size", "",
             f"{calls} timed calls per size and policy, after {calls // 4} warm-up calls; "
             f"a third of the fleet busy; GC on; median of {repeat} runs.", "",
             "| policy | " + " | ".join(f"{int(s):,} nodes p50 / p99 µs" for s in d) + " |",
             "| --- |" + " --- |" * len(d)]
    for policy, by_size in results.items():
        cells = [f"{v['p50_us']} / {v['p99_us']}" for v in by_size.values()]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    big, small, mid = d[str(SIZES[-1])], d[str(SIZES[0])], d.get("10000")
    lines += ["", "Goals (`deadline`):",
              f"- p99 at 10,000 nodes ≤ 50 µs: {mid['p99_us']} µs "
              f"({'met' if mid and mid['p99_us'] <= 50 else 'missed'})" if mid else "",
              f"- p99 at 100,000 nodes within 3× of 100 nodes: {big['p99_us']} / "
              f"{small['p99_us']} = {big['p99_us'] / small['p99_us']:.2f}× "
              f"({'met' if big['p99_us'] <= 3 * small['p99_us'] else 'missed'})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "placement_scale.json")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for policy in args.policies.split(","):
        results[policy] = {}
        for n in SIZES:
            runs = [measure(n, policy, args.calls, args.seed + r) for r in range(args.repeat)]
            results[policy][str(n)] = {k: statistics.median(r[k] for r in runs)
                                       for k in runs[0]}
            print(policy, n, results[policy][str(n)], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results["deadline"], indent=2) + "\n")
    args.out.with_suffix(".policies.json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, args.calls, args.repeat))
    plot(results, args.out.with_suffix(".png"))
    print(markdown(results, args.calls, args.repeat))


if __name__ == "__main__":
    main()

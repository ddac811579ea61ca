"""Every placement policy on every built-in scenario, and the autoscaler baselines.

Runs, per scenario: each placement policy with the ``predictive`` autoscaler, and
``deadline`` with ``static-peak``, ``reactive`` and the simulator's ``clairvoyant`` pool
(planned from the future, each worker asked for a cold start ahead); all with the same
seed, so the same arrivals, failures and service-time draws. Two runs at a time (one per
core).

    .venv/bin/python bench/policies.py [--out bench/results] [--seed 1] [--jobs 2]

Writes DIR/policies.json (every run's summary, the goals checked), DIR/policies.md, and
plots: DIR/policies_slo.png (SLO attainment per policy and scenario) and
DIR/pool_SCENARIO.png (demand and pool size over time for each autoscaler).
Timing goals are read as ratios within this one run; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from plotting import pyplot

from cloud_broker.placement import POLICIES
from sim import BUILTIN, SIM_AUTOSCALERS, load_scenario, simulate
from sim.planner import oracle_gpu_seconds

Run = tuple[str, str, str]  # scenario, policy, autoscaler
KEYS = ("requests", "slo_met_fraction", "slo_missed", "feasible_fraction", "slo_met_of_feasible",
        "latency_ms", "offload_fraction", "cloud_gpu_seconds", "scale_events",
        "placement_flaps", "pulled_back", "redispatched", "static_pool", "pool_peak",
        "outcomes", "windows")


def _order(scenario: str) -> tuple[int, str]:
    return (BUILTIN.index(scenario) if scenario in BUILTIN else len(BUILTIN), scenario)


def runs(scenarios: list[str]) -> list[Run]:
    out = []
    for s in scenarios:
        out += [(s, p, "predictive") for p in POLICIES]
        out += [(s, "deadline", a) for a in SIM_AUTOSCALERS if a != "predictive"]
    return out


def one(run: Run, seed: int) -> dict[str, Any]:
    scenario, policy, autoscaler = run
    started = time.perf_counter()
    report = simulate(load_scenario(scenario), policy=policy, autoscaler=autoscaler, seed=seed)
    wall = time.perf_counter() - started
    summary = {k: report[k] for k in KEYS}
    summary["windows"] = {w: {"requests": v["requests"], "slo_missed": v["slo_missed"],
                              "slo_met_fraction": v["slo_met_fraction"]}
                          for w, v in report["windows"].items()}
    summary.update(scenario=scenario, policy=policy, autoscaler=autoscaler,
                   wall_s=round(wall, 2), sim_requests_per_s=round(report["requests"] / wall))
    if policy == "deadline":  # the plots need these runs' time series
        summary["series"] = report["series"]
    return summary


def find(results: list[dict], scenario: str, policy: str = "deadline",
         autoscaler: str = "predictive") -> dict:
    return next(r for r in results if r["scenario"] == scenario and r["policy"] == policy
                and r["autoscaler"] == autoscaler)


def goals(results: list[dict]) -> dict[str, Any]:
    scenarios = sorted({r["scenario"] for r in results}, key=_order)
    out: dict[str, Any] = {"deadline": {}, "predictive": {}, "flash_ramp": None,
                           "wall_s_max": max(r["wall_s"] for r in results)}
    for s in scenarios:
        d = find(results, s)
        others = [find(results, s, p) for p in POLICIES if p != "deadline"]
        out["deadline"][s] = {
            "slo_met_of_feasible": d["slo_met_of_feasible"],
            "at_least_999": d["slo_met_of_feasible"] >= 0.999,
            "beats_every_baseline": all(d["slo_met_fraction"] > o["slo_met_fraction"]
                                        for o in others),
            "best_baseline": max(o["slo_met_fraction"] for o in others),
        }
        static, pred = find(results, s, autoscaler="static-peak"), d
        seer = find(results, s, autoscaler="clairvoyant")
        static_gpu_s = max(1e-9, static["cloud_gpu_seconds"])
        ratio = pred["cloud_gpu_seconds"] / static_gpu_s
        out["predictive"][s] = {
            "gpu_seconds_vs_static": round(ratio, 3),
            "oracle_vs_static": round(oracle_gpu_seconds(load_scenario(s)) / static_gpu_s, 3),
            "clairvoyant_vs_static": round(seer["cloud_gpu_seconds"] / static_gpu_s, 3),
            "clairvoyant_missed": seer["slo_missed"],
            "slo": pred["slo_met_fraction"], "static_slo": static["slo_met_fraction"],
            "missed": pred["slo_missed"], "static_missed": static["slo_missed"],
            "met": ratio <= 0.5 and pred["slo_met_fraction"] >= static["slo_met_fraction"],
        }
    if "flash-crowd" in scenarios and "ramp" in find(results, "flash-crowd")["windows"]:
        pred = find(results, "flash-crowd")["windows"]["ramp"]["slo_missed"]
        react = find(results, "flash-crowd", autoscaler="reactive")["windows"]["ramp"]["slo_missed"]
        out["flash_ramp"] = {"predictive_missed": pred, "reactive_missed": react,
                             "met": pred * 10 <= react}
    return out


def markdown(results: list[dict], g: dict[str, Any], seed: int) -> str:
    lines = ["# Placement policies and autoscalers in the simulator", "",
             f"Seed {seed}; {platform.python_implementation()} {platform.python_version()} on "
             f"{platform.machine()}, two runs at a time. `of feasible` = SLO met ÷ the feasible "
             "upper bound; GPU-s = cloud GPU-seconds.", "",
             "| scenario | policy | autoscaler | requests | SLO met | of feasible | p50 / p99 ms "
             "| offload | GPU-s | pool peak | flaps | wall s | sim req/s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for r in results:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['scenario']} | {r['policy']} | {r['autoscaler']} | {r['requests']:,} | "
            f"{r['slo_met_fraction']:.4f} | {r['slo_met_of_feasible']:.4f} | "
            f"{lat['p50']:.0f} / {lat['p99']:.0f} | {r['offload_fraction']:.3f} | "
            f"{r['cloud_gpu_seconds']:,.0f} | {r['pool_peak']} | {r['placement_flaps']:,} | "
            f"{r['wall_s']:.1f} | {r['sim_requests_per_s']:,} |")
    lines += ["", "## Goals", ""]
    for s, v in g["deadline"].items():
        lines.append(f"- `deadline` on {s}: {v['slo_met_of_feasible']:.4%} of feasible "
                     f"(≥ 99.9 %: {'met' if v['at_least_999'] else 'missed'}); beats every "
                     f"baseline: {'yes' if v['beats_every_baseline'] else 'no'} (best baseline "
                     f"{v['best_baseline']:.4f})")
    for s, v in g["predictive"].items():
        lines.append(f"- `predictive` on {s}: {v['gpu_seconds_vs_static']:.0%} of static-peak's "
                     f"GPU-seconds at SLO {v['slo']:.5f} ({v['missed']:,} missed) vs "
                     f"{v['static_slo']:.5f} ({v['static_missed']:,} missed) "
                     f"(≤ 50 % at equal or better SLO: {'met' if v['met'] else 'missed'}; "
                     f"a clairvoyant pool: {v['oracle_vs_static']:.0%} started in no time, "
                     f"{v['clairvoyant_vs_static']:.0%} ({v['clairvoyant_missed']:,} missed) "
                     "booting a cold start ahead)")
    if g["flash_ramp"]:
        f = g["flash_ramp"]
        lines.append(f"- flash-crowd ramp: predictive missed {f['predictive_missed']:,}, reactive "
                     f"{f['reactive_missed']:,} (≤ 1/10: {'met' if f['met'] else 'missed'})")
    lines.append(f"- slowest run: {g['wall_s_max']:.1f} s of wall time (goal ≤ 120 s: "
                 f"{'met' if g['wall_s_max'] <= 120 else 'missed'})")
    return "\n".join(lines) + "\n"


def plots(results: list[dict], out: Path) -> None:
    plt = pyplot()
    if plt is not None:
        plot_slo(plt, results, out)
        plot_pools(plt, results, out)


def plot_slo(plt: Any, results: list[dict], out: Path) -> None:
    scenarios = sorted({r["scenario"] for r in results}, key=_order)
    fig, ax = plt.subplots(figsize=(9, 4.4))
    width = 0.8 / len(POLICIES)
    for i, p in enumerate(POLICIES):
        ys = [find(results, s, p)["slo_met_fraction"] for s in scenarios]
        ax.bar([x + i * width for x in range(len(scenarios))], ys, width, label=p)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(scenarios))], scenarios)
    ax.set_ylabel("SLO met (fraction of requests)")
    ax.set_ylim(0, 1.02)
    ax.set_title("SLO attainment per placement policy (predictive autoscaler)")
    ax.legend(fontsize=8, ncol=len(POLICIES), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(out / "policies_slo.png", dpi=120)
    plt.close(fig)


def plot_pools(plt: Any, results: list[dict], out: Path) -> None:
    for s in sorted({r["scenario"] for r in results}, key=_order):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
        series = find(results, s)["series"]
        t = series["t_s"]
        for model, ys in series["arrivals_per_s"].items():
            top.plot(t, ys, label=f"{model} arrivals/s")
        top.plot(t, series["cloud_demand_per_s"], "k--", label="cloud demand/s")
        top.set_ylabel("requests/s")
        top.legend(fontsize=7)
        for a in SIM_AUTOSCALERS:
            pool = find(results, s, autoscaler=a)["series"]["pool"]
            size = [r + b for r, b in zip(pool["ready"], pool["booting"], strict=True)]
            bottom.step(t[:len(size)], size, where="post", label=f"{a} (paid)")
        bottom.set_ylabel("cloud GPUs")
        bottom.set_xlabel("time (s)")
        bottom.legend(fontsize=7)
        top.set_title(f"{s}: demand and pool size")
        fig.tight_layout()
        fig.savefig(out / f"pool_{Path(s).stem}.png", dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--scenarios", default=",".join(BUILTIN))
    args = parser.parse_args()
    todo = runs(args.scenarios.split(","))
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for r in pool.map(one, todo, [args.seed] * len(todo)):
            print(f"{r['scenario']:12s} {r['policy']:16s} {r['autoscaler']:11s} "
                  f"SLO {r['slo_met_fraction']:.4f} GPU-s {r['cloud_gpu_seconds']:,.0f} "
                  f"{r['wall_s']:.1f} s", flush=True)
            results.append(r)
    g = goals(results)
    args.out.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "series"} for r in results]
    (args.out / "policies.json").write_text(
        json.dumps({"seed": args.seed, "runs": slim, "goals": g}, indent=2) + "\n")
    (args.out / "policies.md").write_text(markdown(results, g, args.seed))
    plots(results, args.out)
    print(markdown(results, g, args.seed))


if __name__ == "__main__":
    main()

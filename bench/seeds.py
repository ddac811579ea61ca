"""The autoscaler goals with other seeds: are seed 1's results luck?

Runs ``deadline`` with each autoscaler on the scenarios the cost and ramp goals are read
on, for each seed given (other arrivals, failures and service-time draws).

    .venv/bin/python bench/seeds.py [--seeds 2 3] [--out bench/results] [--jobs 2]

Writes DIR/seeds.json and DIR/seeds.md. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from sim import SIM_AUTOSCALERS, load_scenario, simulate

SCENARIOS = ("bursty", "flash-crowd", "diurnal")


def run(args: tuple[str, str, int]) -> dict[str, Any]:
    scenario, autoscaler, seed = args
    r = simulate(load_scenario(scenario), autoscaler=autoscaler, seed=seed)
    return {"scenario": scenario, "autoscaler": autoscaler, "seed": seed,
            "slo_met_of_feasible": r["slo_met_of_feasible"], "slo_missed": r["slo_missed"],
            "ramp_missed": r["windows"].get("ramp", {}).get("slo_missed"),
            "cloud_gpu_seconds": r["cloud_gpu_seconds"]}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Autoscalers with other seeds", "",
             "`deadline` placement; SLO met of feasible / missed / cloud GPU-s (ramp misses "
             "on flash-crowd); `vs static` = predictive's GPU-s ÷ static-peak's.", "",
             "| scenario | seed | predictive | static-peak | reactive | clairvoyant | vs static |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in SCENARIOS:
        for seed in sorted({r["seed"] for r in rows}):
            by = {r["autoscaler"]: r for r in rows if r["scenario"] == s and r["seed"] == seed}
            if len(by) < len(SIM_AUTOSCALERS):
                continue
            cells = [_cell(by[a]) for a in ("predictive", "static-peak", "reactive", "clairvoyant")]
            ratio = by["predictive"]["cloud_gpu_seconds"] / by["static-peak"]["cloud_gpu_seconds"]
            lines.append(f"| {s} | {seed} | {' | '.join(cells)} | {ratio:.0%} |")
    return "\n".join(lines) + "\n"


def _cell(r: dict[str, Any]) -> str:
    ramp = f" (ramp {r['ramp_missed']:,})" if r["ramp_missed"] is not None else ""
    return (f"{r['slo_met_of_feasible']:.5f} / {r['slo_missed']:,} / "
            f"{r['cloud_gpu_seconds']:,.0f}{ramp}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    todo = [(s, a, seed) for seed in args.seeds for s in SCENARIOS for a in SIM_AUTOSCALERS]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, todo))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.json").write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    (args.out / "seeds.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()

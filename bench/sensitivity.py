"""How the flash-crowd results depend on two knobs the goals are sensitive to.

1. The cloud pool's cold start (15, 30, 45, 60 s) for the three autoscalers: a crowd
   can only be met by a pool that starts before the edges overflow, so past some cold
   start every online autoscaler misses what a pool bought in advance does not.
2. The placement's hysteresis (margin band and dwell time): fewer flaps against more
   cloud GPU-seconds.
3. The predictive autoscaler's early warning and scale-down delay, on bursty,
   flash-crowd and diurnal: SLO against GPU-seconds.

    .venv/bin/python bench/sensitivity.py [--out bench/results] [--seed 1] [--jobs 2]

Writes DIR/sensitivity.json and DIR/sensitivity.md.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cloud_broker.autoscaler import AUTOSCALERS
from cloud_broker.placement import Tuning
from sim import load_scenario, simulate

COLD_STARTS = (15.0, 30.0, 45.0, 60.0)
HYSTERESIS = ((0.0, 0.0), (0.15, 0.0), (0.15, 3_000.0), (0.15, 10_000.0))
# (early_warning, downscale_delay_ms) of the predictive autoscaler, on three scenarios
PREDICTIVE = ((1.0, 30_000.0), (1.0, 60_000.0), (0.5, 30_000.0), (0.5, 60_000.0),
              (0.0, 30_000.0))
PREDICTIVE_SCENARIOS = ("bursty", "flash-crowd", "diurnal")


def cold_start_run(args: tuple[float, str, int]) -> dict[str, Any]:
    cold, autoscaler, seed = args
    spec = load_scenario("flash-crowd")
    spec = spec.model_copy(update={"cloud": spec.cloud.model_copy(update={"cold_start_s": cold})})
    r = simulate(spec, autoscaler=autoscaler, seed=seed)
    return {"cold_start_s": cold, "autoscaler": autoscaler, **_summary(r)}


def hysteresis_run(args: tuple[float, float, int]) -> dict[str, Any]:
    band, dwell, seed = args
    r = simulate(load_scenario("flash-crowd"), seed=seed,
                 tuning=Tuning(hysteresis=band, dwell_ms=dwell))
    return {"hysteresis": band, "dwell_ms": dwell, **_summary(r)}


def predictive_run(args: tuple[str, float, float, int]) -> dict[str, Any]:
    scenario, early, delay, seed = args
    r = simulate(load_scenario(scenario), seed=seed,
                 scaling={"early_warning": early, "downscale_delay_ms": delay})
    return {"scenario": scenario, "early_warning": early, "downscale_delay_ms": delay,
            **_summary(r)}


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    return {"slo_met_fraction": r["slo_met_fraction"], "slo_missed": r["slo_missed"],
            "ramp_missed": r["windows"].get("ramp", {}).get("slo_missed"),
            "cloud_gpu_seconds": r["cloud_gpu_seconds"], "pool_peak": r["pool_peak"],
            "placement_flaps": r["placement_flaps"], "pulled_back": r["pulled_back"]}


def markdown(cold: list[dict[str, Any]], hyst: list[dict[str, Any]],
             pred: list[dict[str, Any]], seed: int) -> str:
    lines = ["# Flash-crowd sensitivity", "", f"Seed {seed}; the built-in `flash-crowd` "
             "scenario (cold start 30 s) with one knob changed.", "",
             "## Cloud cold start × autoscaler", "",
             "| cold start s | autoscaler | SLO met | missed | missed in ramp | GPU-s "
             "| pool peak |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in cold:
        lines.append(f"| {r['cold_start_s']:g} | {r['autoscaler']} | "
                     f"{r['slo_met_fraction']:.5f} | {r['slo_missed']:,} | "
                     f"{r['ramp_missed']:,} | {r['cloud_gpu_seconds']:,.0f} | {r['pool_peak']} |")
    lines += ["", "## Placement hysteresis (deadline, predictive)", "",
              "| margin band | dwell ms | flaps | pulled back | SLO met | GPU-s |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in hyst:
        lines.append(f"| {r['hysteresis']:g} | {r['dwell_ms']:g} | {r['placement_flaps']:,} | "
                     f"{r['pulled_back']:,} | {r['slo_met_fraction']:.5f} | "
                     f"{r['cloud_gpu_seconds']:,.0f} |")
    lines += ["", "## Predictive autoscaler: early warning × scale-down delay", "",
              "| scenario | early warning | scale-down delay s | SLO met | missed | GPU-s |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in pred:
        lines.append(f"| {r['scenario']} | {r['early_warning']:g} | "
                     f"{r['downscale_delay_ms'] / 1000:g} | {r['slo_met_fraction']:.5f} | "
                     f"{r['slo_missed']:,} | {r['cloud_gpu_seconds']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    with ProcessPoolExecutor(args.jobs) as pool:
        cold = list(pool.map(cold_start_run, [(c, a, args.seed) for c in COLD_STARTS
                                              for a in AUTOSCALERS]))
        hyst = list(pool.map(hysteresis_run, [(b, d, args.seed) for b, d in HYSTERESIS]))
        pred = list(pool.map(predictive_run, [(s, e, d, args.seed) for s in PREDICTIVE_SCENARIOS
                                              for e, d in PREDICTIVE]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity.json").write_text(
        json.dumps({"seed": args.seed, "cold_start": cold, "hysteresis": hyst,
                    "predictive": pred}, indent=2) + "\n")
    (args.out / "sensitivity.md").write_text(markdown(cold, hyst, pred, args.seed))
    print(markdown(cold, hyst, pred, args.seed))


if __name__ == "__main__":
    main()

"""What flashing a node costs: bundle sizes, the offline install, an agent's start.

1. ``skyhop bundle`` per platform, Python and role (edge, client; cloud is edge's size);
   the tarball's size and its wheels' share.
2. The host edge bundle installed with the network gone (``unshare -n``), and again
   over itself (an upgrade in place): wall time of install.sh.
3. The installed agent started on each catalog model alone and on all of them (a plain
   Mosquitto here): start to retained birth, and its RSS once born. ``digits`` alone is
   the agent's own footprint: that model is 10 kB.

Needs the package index (wheels, and the catalog's models fetched once), root for
``unshare``, and Mosquitto. Results go to bench/results/deploy.{json,md}.

    .venv/bin/python bench/deploy.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from skyhop.dev.mosquitto import MosquittoProcess
from skyhop.home import Home
from skyhop.models import fetch
from skyhop.protocol.topics import Topics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration.fleet import install_bundle, wait_for_birth

SKYHOP = [sys.executable, "-m", "skyhop"]
TARGETS = [("linux_x86_64", "3.11", "edge"), ("linux_x86_64", "3.11", "client"),
           ("linux_x86_64", "3.10", "edge"), ("linux_aarch64", "3.10", "edge"),
           ("linux_aarch64", "3.10", "client")]


def make_fleet(root: Path) -> Home:
    home = Home(root / "fleet")
    home.init()
    subprocess.run([*SKYHOP, "certs", "init", "--home", str(home.path)], check=True,
                   capture_output=True)
    for entry in home.catalog().models:
        fetch(entry, home.models_dir)
    return home


def bundle(home: Home, node: str, out: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([*SKYHOP, "bundle", node, "--home", str(home.path), "--out", str(out),
                    "--mqtt", "mqtt://127.0.0.1:1883", *args], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def sizes(home: Home, root: Path) -> list[dict[str, object]]:
    rows = []
    for platform, python, role in TARGETS:
        out = root / f"{platform}-{python}-{role}.tar.gz"
        models = ["--models", "digits"] if role != "client" else []
        seconds = bundle(home, f"n-{role}", out, "--platform", platform, "--python", python,
                         "--role", role, *models)
        with tarfile.open(out) as tar:
            wheels = sum(m.size for m in tar.getmembers() if m.name.endswith(".whl"))
            count = sum(m.name.endswith(".whl") for m in tar.getmembers())
        rows.append({"platform": platform, "python": python, "role": role,
                     "tarball_mb": round(out.stat().st_size / 1e6, 1),
                     "wheels_mb": round(wheels / 1e6, 1), "wheels": count,
                     "bundle_s": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for {pid}")


def agent_start(prefix: Path, fleet: Home, models: list[str], url: str) -> dict[str, object]:
    topics = Topics(Home(prefix / "home").config().prefix)
    node = f"start-{len(models)}-{models[0]}"
    start = time.perf_counter()
    agent = subprocess.Popen([str(prefix / "bin" / "skyhop"), "agent", "--home",
                              str(prefix / "home"), "--mqtt", url, "--node-id", node,
                              "--models", ",".join(models), "--log-level", "warning"])
    try:
        wait_for_birth(url, topics, node, 300, agent)
        born = time.perf_counter() - start
        return {"models": ",".join(models), "start_to_birth_s": round(born, 2),
                "rss_mb": rss_mb(agent.pid)}
    finally:
        agent.terminate()
        agent.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="skyhop-deploy-"))
    fleet = make_fleet(root)
    names = list(fleet.catalog().names)
    result: dict[str, object] = {"bundles": sizes(fleet, root)}

    everything = root / "all.tar.gz"
    bundle(fleet, "n-all", everything, "--models", ",".join(names))
    prefix = root / "opt"
    first, again = (install_bundle(everything, prefix, wrap=("unshare", "-n"))
                    for _ in range(2))
    result["install_offline_s"] = {"fresh": round(first, 1), "upgrade": round(again, 1)}
    print(json.dumps(result["install_offline_s"]), flush=True)

    mosquitto = MosquittoProcess.start()
    try:
        starts = [agent_start(prefix, fleet, [m], mosquitto.url) for m in names]
        starts.append(agent_start(prefix, fleet, names, mosquitto.url))
    finally:
        mosquitto.stop()
    for row in starts:
        print(json.dumps(row), flush=True)
    result["agent_start"] = starts
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deploy.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "deploy.md").write_text(markdown(result) + "\n")


def markdown(result: dict[str, object]) -> str:
    md = ["# Flashing a node (bench/deploy.py)", "",
          "| platform | Python | role | tarball MB | wheels MB | wheels | bundle s |",
          "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["bundles"]:  # type: ignore[attr-defined]
        md.append(f"| {r['platform']} | {r['python']} | {r['role']} | {r['tarball_mb']} | "
                  f"{r['wheels_mb']} | {r['wheels']} | {r['bundle_s']} |")
    inst = result["install_offline_s"]
    md += ["", f"Install offline (`unshare -n`, every catalog model): fresh "
           f"{inst['fresh']} s, upgrade in place {inst['upgrade']} s.",  # type: ignore[index]
           "", "| agent serving | start to birth s | RSS MB |", "| --- | ---: | ---: |"]
    for r in result["agent_start"]:  # type: ignore[attr-defined]
        md.append(f"| {r['models']} | {r['start_to_birth_s']} | {r['rss_mb']} |")
    return "\n".join(md)


if __name__ == "__main__":
    main()

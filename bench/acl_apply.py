"""How long `skyhop acl apply` takes against a real Mosquitto, by fleet size.

For each size N: a private Mosquitto with the dynamic-security plugin (TlsMosquitto)
starts with one operator; then `dynsec.apply` gives it N new edge identities at once,
runs again with nothing to change, and revokes one identity. The registry's entries for
the N edges are made in memory (no certificates: the plugin never sees them). Results
go to bench/results/acl_apply.{json,md}.

    .venv/bin/python bench/acl_apply.py [--sizes 100 1000 3000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

from skyhop.dev.mosquitto import TlsMosquitto
from skyhop.mqtt.bus import Bus
from skyhop.mqtt.url import TlsFiles
from skyhop.protocol.topics import Topics
from skyhop.security.acl import desired
from skyhop.security.dynsec import apply
from skyhop.security.pki import Issued, Pki


def timed(bus: Bus, rights: dict[str, list[dict[str, object]]]) -> tuple[int, float]:
    t0 = time.perf_counter()
    commands = apply(bus, rights, timeout=60)
    return len(commands), round(time.perf_counter() - t0, 3)


def one_size(n: int) -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix="skyhop-acl-"))
    pki = Pki(home)
    pki.init()
    pki.issue("op", "operator")
    now = dt.datetime.now(dt.timezone.utc)
    edges = [Issued(f"edge-{i}", "edge", 10_000 + i, now + dt.timedelta(days=30))
             for i in range(n)]
    rights = desired([*pki.entries(), *edges], Topics(), now=now)
    with TlsMosquitto.start(home) as server, \
            Bus(server.url, "op", tls=TlsFiles(*pki.credentials("op"))) as bus:
        added = timed(bus, rights)
        again = timed(bus, rights)
        revoked = timed(bus, {k: v for k, v in rights.items() if k != "edge-0"})
    return {"identities": n, "add_all": {"commands": added[0], "seconds": added[1]},
            "nothing_to_do": {"commands": again[0], "seconds": again[1]},
            "revoke_one": {"commands": revoked[0], "seconds": revoked[1]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 3000])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    runs = []
    for n in args.sizes:
        runs.append(one_size(n))
        print(json.dumps(runs[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "acl_apply.json").write_text(json.dumps(runs, indent=2) + "\n")
    md = ["# `skyhop acl apply` against Mosquitto 2's dynamic-security plugin", "",
          "| identities | all new: commands, s | nothing to change: s | one revoked: "
          "commands, s |", "| ---: | ---: | ---: | ---: |"]
    for r in runs:
        a, z, v = r["add_all"], r["nothing_to_do"], r["revoke_one"]
        md.append(f"| {r['identities']:,} | {a['commands']:,}, {a['seconds']} | "
                  f"{z['seconds']} | {v['commands']}, {v['seconds']} |")
    (args.out / "acl_apply.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

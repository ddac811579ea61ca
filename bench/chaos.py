"""A reproducible chaos run: steady open-loop load on a real local fleet while faults
are injected one after another, counted from what the client and the agents saw.

Fleet: one cloud Mosquitto (plain MQTT, on a fixed port so it can restart), two brokers
on the shared subscription, three edge agents and one cloud agent, all serving `digits`;
edge-3 is at an edge site: its own Mosquitto, bridged to the cloud one
(skyhop.security.bridge) through a 20 ms user-space WAN proxy (skyhop.dev.netem; no
kernel netem here). One client sends Poisson arrivals at ``--rate`` with a
``--budget-ms`` budget. Faults, each followed by a recovery window: kill -9 an agent
(restarted 5 s later), kill -9 a broker (restarted 5 s later), the MQTT server down for
4 s, an agent SIGSTOPped for 10 s, the site's WAN link cut for 5 s (bytes held, as TCP
holds them over a short outage).

Counted per fault, for the requests whose deadline (send + budget) fell in its window (one
sent just before a fault, in flight as it struck, is that fault's):

- **never taken**: no part of the fleet took it, and the client said so: it expired
  in the client's hands while no MQTT server was up ("never sent"), or the server
  said no broker was subscribed, through 2.5 s of re-sends ("no broker is subscribed");
- **no reply**: the client's own timer ended it (budget + slack): no terminal reply
  from the fleet reached it;
- **2+ replies**: more than one reply to one request on the client's reply topic, as a
  tap subscriber saw them (a tap that reconnects after the client, as after a server
  restart, can miss some: a floor, not an exact count);
- **run twice**: one request id in more than one agent run record (``--run-log``);
- **run late**: an agent started the request after the client's deadline (sent at +
  budget; every process here reads the same wall clock, which a bench may use);
- **recovery s**: from the fault's end to the first OK for a request sent after it.

    .venv/bin/python bench/chaos.py [--rate 60] [--budget-ms 1000] [--out bench/results]
    .venv/bin/python bench/chaos.py --soak-minutes 10   # soak.{json,md}: RSS too
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from skyhop.client import Client, Result
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import MosquittoProcess, free_port
from skyhop.dev.netem import DelayProxy
from skyhop.errors import RemoteError
from skyhop.home import Home
from skyhop.mqtt.bus import Bus
from skyhop.process import pause
from skyhop.protocol.topics import Topics
from skyhop.security.bridge import Bridge

AGENTS = {"edge-1": "edge", "edge-2": "edge", "edge-3": "edge", "cloud-1": "cloud"}
# The edges are at a site: its own Mosquitto, bridged to the cloud one over the WAN.
SITE, SITE_AGENTS = "site-a", ("edge-1", "edge-2", "edge-3")
WAN_MS = 20.0  # one way, site to cloud (skyhop.dev.netem)
WINDOW_S = 20.0  # each fault and the recovery after it
CLIENT = "chaos-client"


@dataclass
class Sent:
    id: str
    sent_ms: float
    budget_ms: float
    code: str = ""
    done_ms: float = 0.0
    never_taken: bool = False  # nobody in the fleet took it: see the module's doc
    no_reply: bool = False  # the client's own timer ended it


@dataclass
class Fault:
    name: str
    start_ms: float = 0.0
    end_ms: float = 0.0


@dataclass
class Run:
    stack: LocalStack
    server: MosquittoProcess
    logs: Path
    site_url: str
    log_level: str = "warning"
    window_s: float = WINDOW_S
    faults: list[Fault] = field(default_factory=list)

    def agent(self, name: str) -> None:
        self.stack.agent(name, ["digits"], "--log-level", self.log_level, "--run-log",
                         str(self.logs / f"runs-{name}.jsonl"), role=AGENTS[name],
                         mqtt_url=self.site_url if name in SITE_AGENTS else None)

    def broker(self, name: str) -> None:
        self.stack.broker("--log-level", self.log_level, name=name)

    def fault(self, name: str, act: Callable[[], float | None]) -> None:
        """Run one fault, then its recovery window. ``act`` returns when the fault ended
        (ms), or None: when it returns."""
        f = Fault(name, start_ms=_now_ms())
        print(f"{time.strftime('%H:%M:%S')} fault: {name}", flush=True)
        ended = act()
        f.end_ms = ended if ended is not None else _now_ms()
        self.faults.append(f)
        time.sleep(max(0.0, self.window_s - (_now_ms() - f.start_ms) / 1000))


def _now_ms() -> float:
    return time.time() * 1000


def kill(run: Run, name: str, restart: Callable[[str], None]) -> Callable[[], float]:
    """kill -9 ``name``; the fault is the kill (the others carry on), the restart 5 s
    later is the repair."""
    def act() -> float:
        run.stack.kill(name)
        killed = _now_ms()
        time.sleep(5)
        restart(name)
        return killed
    return act


def server_down(server: MosquittoProcess, seconds: float) -> Callable[[], None]:
    def act() -> None:
        server.restart(down_s=seconds)  # the fault ends once it accepts connections
    return act


def cut_link(wan: DelayProxy, seconds: float) -> Callable[[], None]:
    def act() -> None:
        wan.cut()
        time.sleep(seconds)
        wan.restore()
    return act


def stop_agent(run: Run, name: str, seconds: float) -> Callable[[], None]:
    def act() -> None:
        proc = run.stack.procs[name]
        pause(proc.pid)
        time.sleep(seconds)
        proc.send_signal(signal.SIGCONT)
    return act


class Load:
    """Open-loop Poisson arrivals from one client; each request's fate recorded."""

    def __init__(self, client: Client, rate: float, budget_ms: float) -> None:
        self.client, self.rate, self.budget_ms = client, rate, budget_ms
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        send = client.send_sealed

        def recording(header, envelope, key, **kw):  # type: ignore[no-untyped-def]
            self.sent.append(Sent(header.id, _now_ms(), header.budget_ms))  # submit's thread
            return send(header, envelope, key, **kw)

        client.send_sealed = recording  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        rng = random.Random(7)
        x = {"image": np.zeros((1, 64), np.float32)}
        next_at = time.monotonic()
        while not self._stop.is_set():
            time.sleep(max(0.0, next_at - time.monotonic()))
            future = self.client.submit("digits", x, budget_ms=self.budget_ms)
            future.add_done_callback(self._done(self.sent[-1]))
            next_at += rng.expovariate(self.rate)

    @staticmethod
    def _done(s: Sent) -> Callable[[Future[Result]], None]:
        def record(f: Future[Result]) -> None:
            s.done_ms = _now_ms()
            exc = f.exception()
            s.code = "OK" if exc is None else str(exc.code if isinstance(exc, RemoteError)
                                                  else type(exc).__name__)
            why = exc.message if isinstance(exc, RemoteError) else ""
            s.never_taken = any(w in why for w in ("never sent", "no broker is subscribed"))
            s.no_reply = why.startswith("no reply from the fleet")
        return record

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Rss:
    """Every process's resident memory every ``every_s``: (name, pid) -> [(t s, kB)]."""

    def __init__(self, run: Run, every_s: float = 5.0) -> None:
        self.run, self.every_s = run, every_s
        self.samples: dict[tuple[str, int], list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            procs = {n: p.pid for n, p in self.run.stack.procs.items()}
            procs["mosquitto"] = self.run.server.pid or 0
            for name, pid in procs.items():
                kb = _rss_kb(pid)
                if kb is not None:
                    self.samples.setdefault((name, pid), []).append(
                        (time.monotonic() - self._t0, kb))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def growth(self, warmup_s: float, span_s: float) -> list[dict]:
        """For each process that lived through the run: its mean RSS over the first
        ``span_s`` after ``warmup_s`` and over the last ``span_s``, and the growth."""
        end = max((t for series in self.samples.values() for t, _ in series), default=0.0)
        rows = []
        for (name, pid), series in sorted(self.samples.items()):
            first = [kb for t, kb in series if warmup_s <= t < warmup_s + span_s]
            last = [kb for t, kb in series if t >= end - span_s]
            if not first or not last or series[0][0] > warmup_s:
                continue  # started (restarted) after the warm-up: not comparable
            a, b = sum(first) / len(first), sum(last) / len(last)
            rows.append({"process": name, "pid": pid, "rss_mb_first": round(a / 1024, 1),
                         "rss_mb_last": round(b / 1024, 1),
                         "growth_pct": round((b - a) / a * 100, 2)})
        return rows


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def tap(url: str, topic: str) -> tuple[Bus, Counter[str]]:
    """Count the replies that reach ``topic``, by correlation (the request id)."""
    replies: Counter[str] = Counter()
    bus = Bus(url, f"chaos-tap-{time.monotonic_ns()}")
    bus.subscribe(topic, lambda m: replies.update([(m.correlation or b"").decode()]), qos=1)
    return bus.start(), replies


def runs(logs: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(logs.glob("runs-*.jsonl"))
            for line in p.read_text().splitlines() if line]


def tally(load: Load, faults: list[Fault], replies: Counter[str], ran: list[dict]
          ) -> list[dict]:
    starts: dict[str, list[float]] = {}
    for r in ran:
        starts.setdefault(r["id"], []).append(r["start_ms"])
    rows = []
    for i, f in enumerate(faults):
        until = faults[i + 1].start_ms if i + 1 < len(faults) else math.inf
        # By deadline, not by send: one sent just before a fault, still in flight as it
        # struck, is that fault's.
        mine = [s for s in load.sent if f.start_ms <= s.sent_ms + s.budget_ms < until]
        after = sorted(s.done_ms for s in mine if s.sent_ms >= f.end_ms and s.code == "OK")
        rows.append({
            "fault": f.name,
            "requests": len(mine),
            "codes": dict(Counter(s.code for s in mine)),
            "never_taken": sum(s.never_taken for s in mine),
            "no_reply": sum(s.no_reply for s in mine),
            "two_or_more_replies": sum(replies[s.id] > 1 for s in mine),
            "run_twice": sum(len(starts.get(s.id, [])) > 1 for s in mine),
            "run_late": sum(any(t > s.sent_ms + s.budget_ms for t in starts.get(s.id, []))
                            for s in mine),
            "most_late_ms": round(max([t - s.sent_ms - s.budget_ms for s in mine
                                       for t in starts.get(s.id, [])], default=0.0), 1),
            "recovery_s": round((after[0] - f.end_ms) / 1000, 2) if after else None,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second")
    parser.add_argument("--budget-ms", type=float, default=1000.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--only", nargs="*", metavar="WORD",
                        help="run only the faults whose name holds one of these words")
    parser.add_argument("--log-level", default="warning", help="of the brokers and agents")
    parser.add_argument("--soak-minutes", type=float, default=0,
                        help="soak instead: this long, a fault a minute, RSS sampled; "
                        "writes soak.{json,md}")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="skyhop-chaos-"))
    home = Home(work / "home")
    home.init()
    logs = work / "logs"
    with MosquittoProcess.start(port=free_port(), workdir=work / "mqtt") as server, \
            DelayProxy("127.0.0.1", server.port, delay_ms=WAN_MS) as wan, \
            MosquittoProcess.start_site(Bridge(SITE, "127.0.0.1", wan.port, SITE_AGENTS,
                                               Topics()), work / "site") as site, \
            LocalStack(home, server.url, logs) as stack:
        run = Run(stack, server, logs, site.url, args.log_level)
        for name in ("broker-1", "broker-2"):
            run.broker(name)
        for name in AGENTS:
            run.agent(name)
        stack.wait_live(list(AGENTS), timeout=120)
        tap_bus, replies = tap(server.url, Topics().reply(CLIENT))
        with Client(server.url, home.fleet_public(), client_id=CLIENT) as client:
            load = Load(client, args.rate, args.budget_ms)
            load.start()
            faults = {
                "none (baseline)": lambda: None,
                "kill -9 agent edge-1": kill(run, "edge-1", run.agent),
                "kill -9 broker broker-1": kill(run, "broker-1", run.broker),
                "MQTT server down 4 s": server_down(server, 4.0),
                "SIGSTOP agent edge-2 for 10 s": stop_agent(run, "edge-2", 10.0),
                f"WAN link to {SITE} cut for 5 s": cut_link(wan, 5.0),
            }
            chosen = [n for n in faults if not args.only or any(w in n for w in args.only)]
            rss = Rss(run)
            rss.start()
            if args.soak_minutes:  # one fault a minute, round the list, after a quiet one
                run.window_s = 60.0
                cycle = [n for n in chosen if n != "none (baseline)"] or chosen
                chosen = ["none (baseline)"] + [cycle[i % len(cycle)]
                                                for i in range(int(args.soak_minutes) - 1)]
            for name in chosen:
                run.fault(name, faults[name])
            load.stop()
            rss.stop()
            (work / "client.json").write_text(json.dumps(dict(client.counters)))
            time.sleep((args.budget_ms + client.slack_ms) / 1000 + 2)  # every future ends
        tap_bus.stop()
        rows = tally(load, run.faults, replies, runs(logs))
        (work / "sent.json").write_text(json.dumps([s.__dict__ for s in load.sent]))
    if args.soak_minutes:
        write_soak(args, rows, rss.growth(warmup_s=60.0, span_s=60.0), work)
    else:
        write(args, rows, work)


def write_soak(args: argparse.Namespace, rows: list[dict], memory: list[dict],
               work: Path) -> None:
    keys = ("requests", "never_taken", "no_reply", "two_or_more_replies", "run_twice",
            "run_late")
    totals = {k: sum(r[k] for r in rows) for k in keys}
    result = {"minutes": args.soak_minutes, "rate_per_s": args.rate,
              "budget_ms": args.budget_ms, "totals": totals, "faults": rows,
              "memory": memory, "logs": "(a temp dir of the run)"}
    md = ["# Soak", "",
          f"{args.soak_minutes:g} minutes of `digits` at {args.rate:g} requests/s, budget "
          f"{args.budget_ms:g} ms, a fault every minute after the first "
          "(`bench/chaos.py --soak-minutes`).", "",
          "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys),
          "| " + " | ".join(str(totals[k]) for k in keys) + " |", "",
          "Resident memory of each process that lived through the run, the minute after "
          "the first against the last:", "",
          "| process | first MB | last MB | growth |", "| --- | --- | --- | --- |"]
    md += [f"| {m['process']} | {m['rss_mb_first']} | {m['rss_mb_last']} | "
           f"{m['growth_pct']} % |" for m in memory]
    publish(args.out, "soak", result, md)


def write(args: argparse.Namespace, rows: list[dict], work: Path) -> None:
    result = {"rate_per_s": args.rate, "budget_ms": args.budget_ms, "window_s": WINDOW_S,
              "faults": rows, "logs": str(work / "logs")}
    md = ["# Chaos run", "",
          f"`digits` at {args.rate:g} requests/s, budget {args.budget_ms:g} ms; two brokers, "
          f"one cloud agent; three edge agents at a site bridged over a {WAN_MS:g} ms WAN "
          f"link; each fault then its recovery, "
          f"{WINDOW_S:g} s windows. `bench/chaos.py`.", "",
          "| fault | requests | never taken | no reply | 2+ replies | run twice | run late "
          "| recovery s | outcomes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
        md.append(f"| {r['fault']} | {r['requests']} | {r['never_taken']} | {r['no_reply']} | "
                  f"{r['two_or_more_replies']} | {r['run_twice']} | {r['run_late']} | "
                  f"{r['recovery_s']} | {codes} |")
    publish(args.out, "chaos", result, md)


def publish(out: Path, stem: str, result: dict, md: list[str]) -> None:
    """bench/results/STEM.json and STEM.md, and the Markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

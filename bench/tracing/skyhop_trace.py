"""Stamps on the routed path, for bench/path_profile.py only; never loaded by skyhop.

``install(out_dir)`` wraps the functions a request passes through, in every skyhop
process that imports this (the bench puts bench/tracing/ on PYTHONPATH, whose
sitecustomize calls it): each call appends (wall-clock ns, "name>") on entry and
(ns, "name<") on return. At exit a process writes its stamps to
``out_dir/stamps-PID.json``. One machine, one clock: stamps from the client, the broker
and the agent line up. Each wrapper costs about a microsecond, some 30 per request.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# (module, attribute path, stamp name, stamp the entry, stamp the return)
POINTS = [
    ("paho.mqtt.client", "Client._sock_send", "sock_send", True, True),
    ("paho.mqtt.client", "Client._handle_publish", "recv", True, False),
    ("skyhop.mqtt.bus", "Bus.publish", "publish", True, False),
    ("skyhop.client", "Client.infer", "infer", True, True),
    ("skyhop.client", "seal_request", "seal", False, True),
    ("skyhop.client", "Client._on_reply", "on_reply", True, False),
    ("skyhop.client", "open_reply", "open_reply", False, True),
    ("cloud_broker.broker", "Broker._on_request", "on_request", True, True),
    ("cloud_broker.broker", "Broker._send", "forward", True, False),
    ("cloud_broker.broker", "Broker._on_reply", "on_reply", True, True),
    ("edge_agent.agent", "Agent._on_work", "on_work", True, True),
    ("edge_agent.agent", "Agent._run", "run", True, False),
    ("edge_agent.agent", "open_request", "open", False, True),
    ("edge_agent.runner", "OnnxRunner.run", "ort", True, True),
    ("edge_agent.agent", "seal_reply", "seal_reply", False, True),
]
STAMPS: list[tuple[int, str]] = []


def _wrap(fn: Any, name: str, entry: bool, exit: bool) -> Any:
    @functools.wraps(fn)
    def stamped(*args: Any, **kwargs: Any) -> Any:
        if entry:
            STAMPS.append((time.time_ns(), name + ">"))
        try:
            return fn(*args, **kwargs)
        finally:
            if exit:
                STAMPS.append((time.time_ns(), name + "<"))
    return stamped


def _role() -> str:
    args = sys.argv[1:]
    return args[0] if args and args[0] in ("broker", "agent") else "client"


def install(out_dir: str) -> None:
    for module_name, path, name, entry, exit in POINTS:
        owner: Any = importlib.import_module(module_name)
        *outer, attr = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        setattr(owner, attr, _wrap(getattr(owner, attr), name, entry, exit))
    role, pid = _role(), os.getpid()

    def dump() -> None:
        Path(out_dir, f"stamps-{pid}.json").write_text(json.dumps({"role": role,
                                                                   "stamps": STAMPS}))
    atexit.register(dump)

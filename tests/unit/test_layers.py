"""The layout's rules, checked: pure cores import no I/O, and imports run one way.

- A pure module, imported alone in a fresh interpreter, leaves paho, pydantic,
  onnxruntime, pynvml, subprocess and socket out of ``sys.modules``.
- The broker and the agent meet only on the wire: ``cloud_broker`` never imports
  ``edge_agent``, nor ``edge_agent`` ``cloud_broker``. ``sim`` may import both cores,
  never their shells or paho.
- ``skyhop.protocol`` never imports ``skyhop.mqtt``; only ``skyhop/mqtt/bus.py`` imports
  paho; nothing in production imports the dev harnesses (``skyhop.dev``).
- A pure module imports no shell.

The direction rules read every ``import`` statement, at any depth (a lazy import in a
function is still a dependency).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = [
    "cloud_broker.placement", "cloud_broker.autoscaler", "cloud_broker.dispatch",
    "cloud_broker.fleet", "cloud_broker.tracker", "cloud_broker.demand",
    "cloud_broker.scaling", "cloud_broker.ratelimit", "edge_agent.workqueue",
    "skyhop.protocol.messages", "skyhop.protocol.topics", "skyhop.protocol.envelope",
    "skyhop.protocol.tensors", "skyhop.protocol.replay", "skyhop.protocol.announcement",
    "skyhop.stats", "skyhop.mqtt.url", "skyhop.mqtt.message", "skyhop.mqtt.memory",
    "skyhop.security.sla", "cloud_broker.outcomes", "skyhop.protocol.age",
    "skyhop.security.bridge", "skyhop.batching",
]
IO = ("paho", "pydantic", "onnxruntime", "pynvml", "subprocess", "socket")
SHELLS = ("cloud_broker.broker", "cloud_broker.pool", "edge_agent.agent", "skyhop.mqtt.bus",
          "skyhop.dev", "skyhop.cli", "skyhop.home", "skyhop.client")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names (``from a import b``: a, a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _files(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _offences(files: list[Path], *forbidden: str) -> list[str]:
    return [f"{_module(f)} imports {n}" for f in files for n in sorted(_imports(f))
            if _under(n, *forbidden)]


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_imports_no_io(module: str) -> None:
    # What numpy brings is numpy's (2.2, the last for Python 3.10, imports subprocess),
    # and cryptography.x509's is its own (socket, for the IP addresses in certificates).
    code = (f"import sys, numpy, cryptography.x509; before = set(sys.modules); "
            f"import {module}; "
            f"print(' '.join(m for m in {IO!r} if m in set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.split()
    assert out == [], f"importing {module} imports {', '.join(out)}"


def test_the_broker_and_the_agent_meet_only_on_the_wire() -> None:
    assert _offences(_files("cloud_broker"), "edge_agent") == []
    assert _offences(_files("edge_agent"), "cloud_broker", "sim") == []
    assert _offences(_files("cloud_broker"), "sim") == []


def test_the_simulator_runs_cores_not_shells() -> None:
    assert _offences(_files("sim"), "paho", *SHELLS) == []


def test_the_protocol_knows_no_transport_and_only_the_bus_imports_paho() -> None:
    assert _offences(_files("skyhop/protocol"), "skyhop.mqtt", "skyhop.security",
                     "skyhop.dev", "skyhop.cli", "cloud_broker", "edge_agent") == []
    bus = ("skyhop.mqtt.bus", "skyhop.mqtt.properties")  # the bus, and its packets' parts
    product = [f for f in _files("skyhop", "cloud_broker", "edge_agent", "sim")
               if _module(f) not in bus]
    assert _offences(product, "paho") == []


def test_production_code_does_not_import_the_dev_harnesses() -> None:
    product = [f for f in _files("skyhop", "cloud_broker", "edge_agent", "sim")
               if not _under(_module(f), "skyhop.dev", "skyhop.cli")]
    assert _offences(product, "skyhop.dev") == []


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_imports_no_shell(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    assert _offences([path], *SHELLS) == []

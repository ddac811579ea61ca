"""``skyhop.process.pause``: a SIGSTOP that returns only once every thread is held."""

from __future__ import annotations

import subprocess
import sys

from skyhop.process import _thread_states, pause

# Four threads spinning: without waiting for /proc, some would still be running.
SPIN = """
import threading
def spin():
    while True:
        pass
for _ in range(3):
    threading.Thread(target=spin, daemon=True).start()
print("ready", flush=True)
spin()
"""


def test_pause_returns_once_every_thread_has_stopped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        pause(proc.pid)
        states = _thread_states(proc.pid)
        assert len(states) == 4 and set(states) == {"T"}
    finally:
        proc.kill()
        proc.wait()

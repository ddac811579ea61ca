"""Alarms: many timers on one thread."""

from __future__ import annotations

import threading
import time

from skyhop.alarms import Alarms


def test_alarms_run_in_time_order_and_a_cancelled_one_never_runs() -> None:
    alarms = Alarms("test")
    ran: list[str] = []
    done = threading.Event()
    alarms.after(0.15, ran.append, "late")
    alarms.after(0.05, ran.append, "early")
    alarms.after(0.10, ran.append, "cancelled").cancel()
    alarms.after(0.2, done.set)
    assert done.wait(5)
    alarms.stop()
    assert ran == ["early", "late"]


def test_an_earlier_alarm_wakes_a_thread_sleeping_until_a_later_one() -> None:
    alarms = Alarms("test")
    alarms.after(60, lambda: None)
    done = threading.Event()
    t0 = time.monotonic()
    alarms.after(0.01, done.set)
    assert done.wait(5) and time.monotonic() - t0 < 30
    alarms.stop()


def test_a_failing_callback_does_not_stop_the_others() -> None:
    alarms = Alarms("test")
    done = threading.Event()
    alarms.after(0, lambda: 1 / 0)
    alarms.after(0.01, done.set)
    assert done.wait(5)
    alarms.stop()


def test_nothing_runs_after_stop() -> None:
    alarms = Alarms("test")
    ran: list[int] = []
    alarms.after(0.05, ran.append, 1)
    alarms.stop()
    time.sleep(0.1)
    assert ran == []

"""Message age without agreeing clocks (skyhop.protocol.age): offsets cancel, waits show."""

from __future__ import annotations

import random

from skyhop.protocol.age import Ages

OFFSET = 1.7e12  # the receiver's clock reads this much more than the sender's


def test_offset_cancels_and_the_extra_wait_is_the_age() -> None:
    ages, rng = Ages(), random.Random(1)
    for t in range(0, 10_000, 100):  # a connected sender: 1-30 ms of jitter reads as 0
        assert ages.age_ms("c", t, t + OFFSET + rng.uniform(1, 30)) == 0
    # sent at 10 000, held 8 s in a queue (a disconnect, a stopped process)
    assert 7_970 <= ages.age_ms("c", 10_000, 18_002 + OFFSET) <= 8_001
    assert Ages(tolerance_ms=0).age_ms("c", 0, 1) == 0  # the first sets the base


def test_sources_have_their_own_base() -> None:
    ages = Ages()
    ages.age_ms("a", 0, 5)
    ages.age_ms("b", 0, 5 + 3_600_000)  # another host, another clock
    assert ages.age_ms("a", 100, 105) == 0 and ages.age_ms("b", 100, 105 + 3_600_000) == 0


def test_a_clock_stepped_back_heals_within_two_windows() -> None:
    ages = Ages(window_ms=1_000, tolerance_ms=0)
    for t in range(0, 2_000, 100):
        ages.age_ms("c", t, t + 1)
    step = 5_000  # the sender's clock now reads 5 s less: every message looks 5 s old
    ages_seen = [ages.age_ms("c", t - step, t + 1) for t in range(2_000, 5_000, 100)]
    assert ages_seen[0] == step and ages_seen[-1] == 0


def test_a_silent_source_keeps_its_base() -> None:
    ages = Ages(window_ms=1_000, tolerance_ms=0)
    ages.age_ms("c", 0, 1)
    # silent for a minute, then a message that waited 4 s in the server's queue
    assert ages.age_ms("c", 56_000, 60_001) == 4_000


def test_memory_is_bounded() -> None:
    ages = Ages(max_sources=100)
    for i in range(1_000):
        ages.age_ms(f"c{i}", 0, 1)
    assert len(ages) == 100

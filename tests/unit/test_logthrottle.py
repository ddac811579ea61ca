from skyhop.logthrottle import LogThrottle


def test_one_line_per_key_per_period_with_what_was_held_back() -> None:
    lines = LogThrottle(every_ms=1000)
    assert lines.admit("load", 0) == 0  # the first is always logged
    assert lines.admit("load", 10) is None
    assert lines.admit("load", 999) is None
    assert lines.admit("sla", 500) == 0  # keys are throttled apart
    assert lines.admit("load", 1000) == 2  # a period later: logged, with the two held back
    assert lines.admit("load", 1500) is None
    assert LogThrottle.suffix(0) == "" and "2 more" in LogThrottle.suffix(2)

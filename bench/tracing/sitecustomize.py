"""Loaded by Python at start-up in processes bench/path_profile.py spawns."""

import os

if os.environ.get("SKYHOP_TRACE_DIR"):
    import skyhop_trace

    skyhop_trace.install(os.environ["SKYHOP_TRACE_DIR"])

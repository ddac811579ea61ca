"""Plots are optional: the JSON and Markdown results are the benchmark's output."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any | None:
    """matplotlib's pyplot on the Agg backend, or None, said once, when it is absent."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is not installed (pip install 'skyhop[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

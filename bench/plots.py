"""Plots are optional: matplotlib may be missing where a benchmark runs (its --replot redraws later)."""
import sys


def try_plot(draw):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plot (rerun with --replot on the JSON where it is)", file=sys.stderr)
        return
    draw()

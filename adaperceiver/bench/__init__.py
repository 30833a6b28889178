"""The benchmark harness: ``python -m adaperceiver.bench`` (``adaperceiver-bench``).

grid.py (which (t, w, l) to run), timing.py (warm-up, rounds, median and spread; environment),
baselines.py (timm baselines and their FLOPs), runner.py (building and timing), report.py (the
table and result files), plot.py (the Pareto plot), roofline.py (the GPU projection).
"""
from .grid import Config, GridError, ModelAxes, RELEASED, default_axes, parse_grid  # noqa: F401
from .timing import Timing, environment, time_step  # noqa: F401

__all__ = ["Config", "GridError", "ModelAxes", "RELEASED", "default_axes", "parse_grid",
           "Timing", "environment", "time_step", "main", "run"]


def main(argv=None) -> int:
    from .__main__ import main as _main
    return _main(argv)


def run(argv=None) -> dict:
    from .__main__ import run as _run
    return _run(argv)

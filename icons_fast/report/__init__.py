"""``icons-fast report RUN_DIR``: PNG plots and one self-contained HTML page for a run directory.

Three modules, one job each: :mod:`~icons_fast.report.data` reads the run
directory and computes the numbers behind every figure as plain arrays,
:mod:`~icons_fast.report.plots` draws them with matplotlib (Agg canvas), and
:mod:`~icons_fast.report.html` writes the page (its docstring lists the files).
"""
from icons_fast.report.html import write_report

__all__ = ["write_report"]

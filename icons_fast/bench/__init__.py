"""Side-by-side throughput benchmarks (``icons-fast bench``) and their shared helpers.

- ``timing``: warm-up, synchronised median / p20 / p80 timing, interleaved
  providers, result rows (device name, versions, date, FLOP/s), CSV/JSON.
- ``models``: benchmark configs (tiny, small, llava-7b-shape), synthetic
  batches, analytic FLOPs.
- ``featurize``: ours vs the LoRA forward+backward floor vs the LESS/ICONS-style
  one-sample-per-step baseline.
- ``ops``: projection, influence and voting providers.
- ``suite``: ``run_bench`` and the CLI command ``cmd_bench`` (imported when a benchmark runs: torch loads only then).

The scripts in ``benchmarks/`` call these; results are recorded in
``benchmarks/RESULTS.md``.
"""
from icons_fast.bench.args import CONFIG_NAMES, SUITES, add_arguments

__all__ = ["CONFIG_NAMES", "SUITES", "add_arguments"]

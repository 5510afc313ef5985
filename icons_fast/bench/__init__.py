"""Side-by-side throughput benchmarks (``icons-fast bench``) and their shared helpers.

- ``timing``: warm-up, synchronised median / p20 / p80 timing, interleaved
  providers, result rows (device name, versions, date, FLOP/s), CSV/JSON.
- ``models``: benchmark configs (tiny, small, llava-7b-shape), synthetic
  batches, analytic FLOPs.
- ``featurize``: ours vs the LoRA forward+backward floor vs the LESS/ICONS-style
  one-sample-per-step baseline.
- ``ops``: projection, influence and voting providers.
- ``suite``: ``run_bench`` and the CLI command.

The scripts in ``benchmarks/`` call these; results are recorded in
``benchmarks/RESULTS.md``.
"""
from icons_fast.bench.args import CONFIG_NAMES, SUITES, add_arguments


def run_bench(*args, **kwargs):
    """See ``icons_fast.bench.suite.run_bench`` (imported lazily: torch loads only when a benchmark runs)."""
    from icons_fast.bench.suite import run_bench as run

    return run(*args, **kwargs)


def cmd_bench(args) -> int:
    """Entry point of ``icons-fast bench``."""
    from icons_fast.bench.suite import cmd_bench as run

    return run(args)


__all__ = ["CONFIG_NAMES", "SUITES", "add_arguments", "cmd_bench", "run_bench"]

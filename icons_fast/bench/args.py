"""The ``bench`` command's flags (no torch import: building the CLI parser stays fast)."""
from __future__ import annotations

SUITES = ("featurize", "projection", "influence", "voting")
CONFIG_NAMES = ("tiny", "small", "llava-7b-shape")  # keys of icons_fast.bench.models.BENCH_CONFIGS
REPEATS, QUICK_REPEATS = 3, 2  # timed repeats per provider when --repeats is not given


def add_arguments(p) -> None:
    """Add the ``bench`` flags; ``--batch-size``, ``--proj-dim`` and ``--device`` come from the common ones."""
    p.add_argument("--quick", action="store_true", help="every CPU suite at tiny sizes (CI smoke, < 1 min)")
    p.add_argument("--config-name", choices=CONFIG_NAMES, help="featurize model config (default: tiny with "
                   "--quick, small on a CPU, llava-7b-shape on a GPU)")
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--repeats", type=int,
                   help=f"timed repeats per provider (default {REPEATS}, {QUICK_REPEATS} with --quick)")
    p.add_argument("--layers", type=int, help="llava-7b-shape: decoder layers (default 32)")
    p.add_argument("--seq", type=int, help="tokens per sample (default from the config)")
    p.add_argument("--baseline", default="auto", choices=["auto", "trak", "dense", "ours", "none"],
                   help="projector of the LESS-style baseline (default %(default)s: TRAK when installed)")
    p.add_argument("--csv", help="write the rows here")
    p.add_argument("--json", help="write the rows (and the run's settings) here")

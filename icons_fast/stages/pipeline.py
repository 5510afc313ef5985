"""The whole ICONS selection: warmup -> featurize (pool + targets) -> influence -> select.

Reads the pool and target files named in the config; writes a whole run
directory (``config.json``, ``warmup/``, ``features/``, ``errors/``,
``scores/``, ``selection/``; see ``icons_fast.rundir``) through the stages:
``stages.warmup``, ``stages.featurize``, ``stages.influence``, ``stages.select``.
Each stage reads the previous stage's files and is skipped (or resumed) when
its outputs are complete and were made under the same settings, so a killed
run is rerun with the same command.
"""
from __future__ import annotations

import logging
import os
import time

from icons_fast.config import Config
from icons_fast.rundir import RunLayout, writer_lock

log = logging.getLogger(__name__)


def featurize_all(cfg: Config, run_dir: str, shard: str | None = None, splits: list[str] | None = None,
                  verify: bool = False) -> None:
    """Featurize the pool and every target set (or only ``splits``) under every warmup checkpoint.

    ``verify``: hash every existing shard before trusting it (``featurize --verify``).
    Holds the writer lock throughout; one SIGTERM stops after the shard in flight
    (``Preempted``), whichever split it belongs to.
    """
    from icons_fast.signals import GracefulStop
    from icons_fast.stages.featurize import featurize_split, split_jobs

    with writer_lock(run_dir, "featurize", cfg, shard), GracefulStop() as stop:
        ckpts = RunLayout(run_dir).warmup_checkpoints()
        for ckpt in ckpts:
            for split, path, mode, images in split_jobs(cfg):
                if splits and split not in splits:
                    continue
                if not path:
                    raise ValueError(f"no data file for split {split!r}: pass --train-data / --target NAME=FILE")
                featurize_split(cfg, run_dir, split, path, ckpt, mode, shard=shard, image_folder=images,
                                verify=verify, stop=stop)


def run(cfg: Config) -> dict:
    """Run every stage into ``cfg.out``; return the selection's paths (``{}`` on ranks other than 0)."""
    from icons_fast.distributed import barrier, init_distributed, is_main
    from icons_fast.stages.influence import run_influence
    from icons_fast.stages.select import run_select
    from icons_fast.stages.warmup import run_warmup

    run_dir = cfg.out
    init_distributed()
    t0 = time.perf_counter()
    with writer_lock(run_dir, "run", cfg):  # every rank joins; the stages below run inside it
        if is_main():  # warmup is one short job; the other ranks wait for its checkpoints
            os.makedirs(run_dir, exist_ok=True)
            cfg.save(run_dir)
            run_warmup(cfg, run_dir)
        barrier()
        featurize_all(cfg, run_dir)
        if not is_main():
            return {}
        run_influence(cfg, run_dir)
        paths = run_select(cfg, run_dir)
    log.info("[run] done in %.1f s: %s", time.perf_counter() - t0, RunLayout(run_dir).selection)
    return paths

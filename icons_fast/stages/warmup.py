"""Stage 1: LoRA warmup on a seeded random fraction of the pool.

Saves checkpoints (adapter + Adam moments by parameter name + learning rate;
format in ``icons_fast.train.checkpoint``) that the featurize stage reads.
A finished warmup made under the same settings is reused, not redone; one
made under other settings or from another pool file (its fingerprint differs)
is removed and retrained.

A SIGTERM finishes the optimizer step in flight and stops with ``Preempted``
(exit code 75 at the command line). Warmup does not resume mid-way: the rerun
starts it again from step 0 (it is the short stage: a few percent of the pool
for one epoch). The writer lock of the run directory is held throughout.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import torch

from icons_fast.config import Config
from icons_fast.data.formats import is_hub_id
from icons_fast.fileio import atomic_json, atomic_write, move_aside
from icons_fast.rundir import RunLayout, writer_lock
from icons_fast.signals import GracefulStop, Preempted
from icons_fast.train.checkpoint import list_checkpoints, save_lora_checkpoint

log = logging.getLogger(__name__)


def warmup_subset(n_pool: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted pool indices of the seeded random warmup subset (at least one sample)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"warmup fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * n_pool)))
    return np.sort(np.random.default_rng(seed).choice(n_pool, size=k, replace=False))


def warmup_inputs(cfg: Config) -> dict:
    """What the warmup depends on: the pool (path and content), its images, max_length, model, warmup, seed.

    Target sets are left out on purpose: adding a target task must not retrain the warmup.
    """
    from icons_fast.data.formats import source_sha256

    d = cfg.to_dict()
    return {
        "train_data": os.path.abspath(cfg.data.train_data) if cfg.data.train_data else None,
        "train_sha256": source_sha256(cfg.data.train_data) if cfg.data.train_data else None,
        "image_folder": cfg.data.image_folder,
        "max_length": cfg.data.max_length,
        "template": cfg.data.template,
        "model": d["model"],
        "warmup": d["warmup"],
        "seed": cfg.seed,
    }


def warmup_fingerprint(cfg: Config) -> str:
    """sha256 (16 hex) of ``warmup_inputs(cfg)``: a finished warmup with another fingerprint is retrained."""
    return hashlib.sha256(json.dumps(warmup_inputs(cfg), sort_keys=True).encode()).hexdigest()[:16]


def run_warmup(cfg: Config, run_dir: str | None = None) -> list[str]:
    """Train LoRA on the warmup subset; return the checkpoint directories (by step)."""
    with writer_lock(run_dir or cfg.out, "warmup", cfg), GracefulStop() as stop:
        return _run_warmup(cfg, run_dir or cfg.out, stop)


def _set_aside_stale_features(layout: RunLayout, old_fingerprint: str | None) -> None:
    """Move ``features/`` aside when the warmup that made its checkpoints is retrained.

    Those features come from checkpoints the new warmup deletes, so they can be
    neither resumed nor mixed with the new ones (featurize refuses them). They are
    renamed to ``features.stale-<digest of the old warmup fingerprint>``
    (:func:`~icons_fast.fileio.move_aside`), kept rather than deleted, and the log
    says where; later stages recompute from the new checkpoints.
    """
    features = layout.path("features")
    if not os.path.isdir(features) or not os.listdir(features):
        return
    aside = move_aside(features, "stale", old_fingerprint)
    log.warning("%s was made from the replaced warmup's checkpoints: moved to %s (delete it to free the space)",
                features, aside)


def _run_warmup(cfg: Config, run_dir: str, stop: GracefulStop) -> list[str]:
    from icons_fast.data import ErrorLog, load_records
    from icons_fast.data.loader import make_dataset
    from icons_fast.model.loading import load_model
    from icons_fast.model.lora import attach_lora
    from icons_fast.train.loop import Schedule, train_model

    if not cfg.data.train_data:
        raise ValueError("warmup needs the training pool: --train-data FILE.json")
    if not os.path.exists(cfg.data.train_data) and not is_hub_id(cfg.data.train_data):
        raise FileNotFoundError(f"the pool {cfg.data.train_data!r} (--train-data) does not exist")
    layout = RunLayout(run_dir)
    done_path = layout.warmup_done
    fp = warmup_fingerprint(cfg)
    if os.path.exists(done_path):
        with open(done_path) as f:
            done = json.load(f)
        if done.get("fingerprint") != fp:
            old = done.get("inputs") or {}
            changed = sorted(k for k, v in warmup_inputs(cfg).items() if old.get(k) != v) or ["settings"]
            log.warning("the warmup in %s was made from other inputs (%s differ): retraining it", layout.warmup,
                        ", ".join(changed))
            _set_aside_stale_features(layout, done.get("fingerprint"))
        else:
            try:
                ckpts = layout.warmup_checkpoints()
            except FileNotFoundError:
                ckpts = None
            if ckpts:
                log.info("reusing %d checkpoint(s) in %s", len(ckpts), layout.warmup)
                return ckpts
    os.makedirs(layout.warmup, exist_ok=True)
    # A new warmup: the old record and checkpoints (other settings) must not be mistaken for this run's.
    if os.path.exists(done_path):
        os.remove(done_path)
    for old in list_checkpoints(layout.warmup):
        shutil.rmtree(old)
    records = load_records(cfg.data.train_data)
    subset = warmup_subset(len(records), cfg.warmup.fraction, cfg.seed)
    atomic_write(os.path.join(layout.warmup, "subset.txt"), lambda f: np.savetxt(f, subset, fmt="%d"))

    lm = load_model(cfg.model.model, cfg.model.dtype, cfg.resolved_device(), seed=cfg.seed)
    # LoRA's initial A matrices and the dropout masks come from torch's global generator: seeded,
    # a rerun (after a preemption, say) trains exactly the warmup an uninterrupted run trains.
    torch.manual_seed(cfg.seed)
    model = attach_lora(lm.model, cfg.model)
    errors = ErrorLog(layout.errors("train"))
    dataset, collate = make_dataset(lm, records, cfg.data.image_folder, cfg.data.max_length, errors, stage="data",
                                   template=cfg.data.template)
    saved: list[str] = []

    def save(step, lr, epoch, samples, optimizer):
        saved.append(
            save_lora_checkpoint(
                layout.warmup, model, optimizer, step, lr, epoch, samples, extra={"base_model": lm.path}
            )
        )

    def after_step(step: int, total: int) -> None:
        if stop.requested and step < total:  # at the last step the warmup is finished: let it be recorded
            raise Preempted(f"warmup stopped by SIGTERM after step {step} of {total}; warmup does not resume "
                            f"mid-way: rerunning the same command restarts it from step 0")

    log.info("%d of %d samples (%.1f%%), %d epoch(s)", len(subset), len(records), 100 * cfg.warmup.fraction,
             cfg.warmup.epochs)
    summary = train_model(
        model,
        dataset,
        collate,
        indices=subset.tolist(),
        schedule=Schedule.of(cfg.warmup),
        seed=cfg.seed,
        n_checkpoints=cfg.warmup.num_checkpoints,
        save_checkpoint=save,
        error_log=errors,
        desc="warmup",
        after_step=after_step,
    )
    checkpoints = [c for c in list_checkpoints(layout.warmup) if c in saved]
    # names, not paths: a run directory can be moved or copied
    names = [os.path.basename(c) for c in checkpoints]
    atomic_json(done_path, {"fingerprint": fp, "inputs": warmup_inputs(cfg), "checkpoints": names,
                            "summary": summary})
    log.info("%d steps, %.1f samples/s, %d sample(s) excluded (see %s)", summary["steps"], summary["samples_per_s"],
             len(summary["excluded"]), layout.errors("train"))
    return checkpoints

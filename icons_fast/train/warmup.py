"""Stage 1: LoRA warmup on a seeded random fraction of the pool.

Saves checkpoints (adapter + Adam moments by parameter name + learning rate;
format in ``icons_fast.train.checkpoint``) that the featurize stage reads.
A finished warmup made under the same settings is reused, not redone.
"""
from __future__ import annotations

import json
import os

import numpy as np

from icons_fast.config import Config
from icons_fast.fileio import atomic_json
from icons_fast.rundir import RunLayout
from icons_fast.train.checkpoint import list_checkpoints, save_lora_checkpoint

DONE_FILE = "warmup_done.json"


def warmup_subset(n_pool: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted pool indices of the seeded random warmup subset (at least one sample)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"warmup fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * n_pool)))
    return np.sort(np.random.default_rng(seed).choice(n_pool, size=k, replace=False))


def warmup_fingerprint(cfg: Config) -> str:
    return cfg.fingerprint("data", "model", "warmup") + f"-seed{cfg.seed}"


def run_warmup(cfg: Config, run_dir: str | None = None) -> list[str]:
    """Train LoRA on the warmup subset; return the checkpoint directories (by step)."""
    from icons_fast.data import ErrorLog, load_records
    from icons_fast.data.loader import make_dataset
    from icons_fast.model.loading import load_model
    from icons_fast.model.lora import attach_lora
    from icons_fast.train.loop import train_model

    layout = RunLayout(run_dir or cfg.out)
    done_path = os.path.join(layout.warmup, DONE_FILE)
    fp = warmup_fingerprint(cfg)
    if os.path.exists(done_path):
        with open(done_path) as f:
            done = json.load(f)
        if done.get("fingerprint") == fp and all(os.path.isdir(c) for c in done["checkpoints"]):
            print(f"[warmup] reusing {len(done['checkpoints'])} checkpoint(s) in {layout.warmup}")
            return done["checkpoints"]
    if not cfg.data.train_data:
        raise ValueError("warmup needs the training pool: --train-data FILE.json")
    os.makedirs(layout.warmup, exist_ok=True)
    records = load_records(cfg.data.train_data)
    subset = warmup_subset(len(records), cfg.warmup.fraction, cfg.seed)
    np.savetxt(os.path.join(layout.warmup, "subset.txt"), subset, fmt="%d")

    lm = load_model(cfg.model.model, cfg.model.dtype, cfg.resolved_device(), seed=cfg.seed)
    model = attach_lora(lm.model, cfg.model)
    errors = ErrorLog(layout.errors("train"))
    dataset, collate = make_dataset(lm, records, cfg.data.image_folder, cfg.data.max_length, errors, stage="data")
    saved: list[str] = []

    def save(step, lr, epoch, samples, optimizer):
        saved.append(
            save_lora_checkpoint(
                layout.warmup, model, optimizer, step, lr, epoch, samples, extra={"base_model": lm.path}
            )
        )

    print(f"[warmup] {len(subset)} of {len(records)} samples ({cfg.warmup.fraction:.1%}), {cfg.warmup.epochs} epoch(s)")
    summary = train_model(
        model,
        dataset,
        collate,
        indices=subset.tolist(),
        batch_size=cfg.warmup.batch_size,
        epochs=cfg.warmup.epochs,
        lr=cfg.warmup.lr,
        warmup_ratio=cfg.warmup.warmup_ratio,
        weight_decay=cfg.warmup.weight_decay,
        seed=cfg.seed,
        n_checkpoints=cfg.warmup.num_checkpoints,
        save_checkpoint=save,
        error_log=errors,
        desc="warmup",
    )
    checkpoints = [c for c in list_checkpoints(layout.warmup) if c in saved]
    atomic_json(done_path, {"fingerprint": fp, "checkpoints": checkpoints, "summary": summary})
    print(
        f"[warmup] {summary['steps']} steps, {summary['samples_per_s']:.1f} samples/s, "
        f"{len(summary['excluded'])} sample(s) excluded (see {layout.errors('train')})"
    )
    return checkpoints

"""``icons-fast train``: fine-tune a model on a (selected) subset.

LoRA fine-tuning with the warmup machinery (same loop, schedule and data
path), or ``full_finetune`` of every parameter (used to pre-train the tiny
base so that LoRA has something to build on). The result is saved as a
complete model directory ``OUT/model`` (LoRA merged into the weights) with its
processor, so ``evaluate``, ``featurize`` and ``warmup`` load it like any
llava-hf directory.
"""
from __future__ import annotations

import logging
import os
import shutil

from icons_fast.config import Config
from icons_fast.fileio import atomic_json

log = logging.getLogger(__name__)


def run_train(cfg: Config, data_path: str, out_dir: str) -> str:
    """Train on every record of ``data_path``; return the saved model directory."""
    from icons_fast.data import ErrorLog, load_records
    from icons_fast.data.loader import make_dataset
    from icons_fast.model.loading import load_model
    from icons_fast.model.lora import attach_lora
    from icons_fast.train.loop import Schedule, train_model

    records = load_records(data_path)
    lm = load_model(cfg.model.model, cfg.model.dtype, cfg.resolved_device(), seed=cfg.seed)
    model = lm.model
    if cfg.train.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = attach_lora(model, cfg.model)
    os.makedirs(out_dir, exist_ok=True)
    errors = ErrorLog(os.path.join(out_dir, "errors.jsonl"))
    dataset, collate = make_dataset(lm, records, cfg.data.image_folder, cfg.data.max_length, errors, stage="data",
                                   template=cfg.data.template)
    kind = "full fine-tune" if cfg.train.full_finetune else f"LoRA r={cfg.model.lora_r}"
    log.info("%s on %d samples from %s, %d epoch(s)", kind, len(records), data_path, cfg.train.epochs)
    summary = train_model(
        model,
        dataset,
        collate,
        indices=list(range(len(records))),
        schedule=Schedule.of(cfg.train),
        seed=cfg.seed,
        error_log=errors,
        desc="train",
    )
    if not cfg.train.full_finetune:
        model = model.merge_and_unload()
    final = os.path.join(out_dir, "model")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    lm.processor.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    summary.update(data=os.path.abspath(data_path), base_model=lm.path, full_finetune=cfg.train.full_finetune)
    atomic_json(os.path.join(out_dir, "train_summary.json"), summary)
    log.info("%d steps, final loss %.3f; model saved to %s", summary["steps"], summary["final_loss"], final)
    return final

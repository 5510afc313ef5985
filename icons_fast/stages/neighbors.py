"""``icons-fast neighbors``: nearest-neighbour influence retrieval in a run directory.

Reads ``warmup/warmup_done.json`` (the last checkpoint of the finished warmup),
``features/<ckpt>/train/`` and ``features/<ckpt>/target-*/`` (building
``faiss.index`` beside a target split when it is missing or stale,
``stages.target_index``). Writes the result as JSON to ``json_out`` when given;
nothing else. Features made from another pool or target file, checkpoint or
setting are refused (``influence.check_fresh``). The retrieval itself is
``icons_fast.select.neighbors``.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from icons_fast.config import Config
from icons_fast.fileio import atomic_json
from icons_fast.rundir import RunLayout, target_splits
from icons_fast.select.neighbors import targets_for_train, train_for_targets
from icons_fast.stages.influence import check_fresh
from icons_fast.stages.target_index import target_index

log = logging.getLogger(__name__)


def _train_rows(train, wanted: list[int], block_size: int) -> tuple[list, torch.Tensor]:
    """Ids and features ``[q, k]`` of the pool samples ``wanted``, gathered block by block (never the whole pool)."""
    found = {}  # sample index -> (id, feature row)
    for idx, ids, feats, _ in train.iter_blocks(block_size, verify=False):
        for p in np.flatnonzero(np.isin(idx, wanted)):
            found[int(idx[p])] = (ids[p], feats[p])
    missing = [i for i in wanted if int(i) not in found]
    if missing:
        raise ValueError(f"train samples {missing[:5]} have no features (excluded as bad samples?)")
    return [found[int(i)][0] for i in wanted], torch.stack([found[int(i)][1] for i in wanted])


def split_neighbors(layout: RunLayout, ckpt: str, split: str, m: int = 10, block_size: int = 65536,
                    train_rows: list[int] | None = None) -> dict:
    """Top-m retrieval both ways between checkpoint ``ckpt``'s train features and one target split.

    Return ``{"per_target": [{index, id, neighbors: [{index, id, score}]}], "per_train": [...]}``
    (``per_train`` only for the pool sample indices in ``train_rows``).
    """
    index, tstore = target_index(layout.features(ckpt, split))
    t_idx, t_ids, _, _ = tstore.load(verify=False)
    train = layout.feature_store(ckpt, "train")
    blocks = ((idx, ids, feats) for idx, ids, feats, _ in train.iter_blocks(block_size))
    out = {"per_target": train_for_targets(index, t_idx, t_ids, blocks, m), "per_train": []}
    if train_rows:
        ids, feats = _train_rows(train, [int(i) for i in train_rows], block_size)
        out["per_train"] = targets_for_train(index, t_idx, t_ids, train_rows, ids, feats, m)
    return out


def run_neighbors(cfg: Config, run_dir: str | None = None, m: int = 10, task: str | None = None,
                  train_rows: list[int] | None = None, json_out: str | None = None) -> dict:
    """Retrieval for every target (sub)task (or only ``task``) under the last warmup checkpoint.

    Return ``{"checkpoint": name, "m": m, "tasks": {name: split_neighbors(...)}}``;
    also written to ``json_out`` when given.
    """
    layout = RunLayout(run_dir or cfg.out)
    check_fresh(cfg, layout)  # never retrieve from features of another pool, target file or checkpoint
    ckpt = os.path.basename(layout.warmup_checkpoints()[-1])
    result = {}
    for name_task, subs in target_splits(cfg.data.targets).items():
        if task and name_task != task:
            continue
        for sub, split in subs.items():
            name = name_task if sub is None else f"{name_task}/{sub}"
            result[name] = split_neighbors(layout, ckpt, split, m=m, train_rows=train_rows)
    out = {"checkpoint": ckpt, "m": m, "tasks": result}
    if json_out:
        atomic_json(json_out, out, indent=1)
        log.info("[neighbors] wrote %s", json_out)
    return out

"""Stage 3: per-task influence scores from a run's feature stores.

Reads ``warmup/`` (the finished warmup's checkpoints and their learning rates),
``features/<ckpt>/train/`` and ``features/<ckpt>/target-*/`` for every
checkpoint (target sides through ``stages.target_index``, which may write
``faiss.index`` beside them), and ``errors/<split>.jsonl``. Writes
``scores/scores.npy`` (float32 ``[N, T]``, NaN for excluded samples),
``scores/valid.npy`` (bool ``[N]``) and ``scores/task_names.json`` (task names,
checkpoints, weights, aggregate and the fingerprint of the inputs, so a rerun
on unchanged inputs is skipped).

Every checkpoint's train features are streamed together in blocks (memory
bounded by the block and by the ``N x T`` score matrix), so that per subtask
the checkpoint-weighted sum comes first and the max over subtasks after it
(``select.influence``). A sample missing from any checkpoint's features (a
bad sample) gets NaN scores and ``valid = False``.

``run_tracin_scores`` computes TracIn scores the same way, in the
unnormalised mode (for ``icons-fast select --rule tracin``); it writes nothing.

Stale inputs are refused, never reported up to date: before anything else,
``check_fresh`` compares every feature store's fingerprint with the files and
settings of this config (the pool and target files' sha256, the checkpoints'
sha256, the projection settings) and names what changed and the command that
brings the run up to date. A corrupt shard met while reading stops the stage
with one line naming the shard and the exact ``icons-fast featurize ...
--verify`` command that repairs it. The writer lock of the run directory is
held while ``scores/`` is written.

The math is ``icons_fast.select.influence`` (arrays in, scores out), on top of
the segment-reduce op; this module is the same concept one level up: files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import torch

from icons_fast.config import Config
from icons_fast.data.formats import source_sha256
from icons_fast.features.store import CorruptShard
from icons_fast.fileio import atomic_json, atomic_npy
from icons_fast.rundir import RunLayout, target_splits, writer_lock
from icons_fast.stages.featurize import explain_corrupt, feature_settings, split_jobs
from icons_fast.select.influence import checkpoint_weights_normalised, raw_projections, stream_task_influence
from icons_fast.stages.target_index import target_vectors

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 8192  # train rows per streamed block


def scores_meta(layout: RunLayout) -> dict | None:
    """``scores/task_names.json`` (names, checkpoints, aggregate, inputs fingerprint), None when the scores are incomplete."""
    paths = layout.score_files()
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    with open(paths["task_names"]) as f:
        return json.load(f)


def load_scores(run_dir: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``(scores [N, T] float32 with NaN on excluded samples, task names, valid [N] bool)`` of a run."""
    paths = RunLayout(run_dir).score_files()
    scores = np.load(paths["scores"])
    valid = np.load(paths["valid"])
    with open(paths["task_names"]) as f:
        names = json.load(f)["task_names"]
    return scores, names, valid


def _tasks(cfg: Config) -> dict[str, dict[str | None, str]]:
    tasks = target_splits(cfg.data.targets)
    if not tasks:
        raise ValueError("no target task: pass --target NAME=FILE.json (repeatable)")
    return tasks


def scores_inputs(cfg: Config, layout: RunLayout) -> str:
    """sha256 of what the scores depend on: checkpoints + lrs, every shard's checksum, aggregate, tasks.

    Compared with the fingerprint stored in ``scores/task_names.json`` to skip an
    up-to-date influence stage and to refuse selecting from stale scores.
    """
    ckpts = layout.checkpoint_lrs()
    tasks = _tasks(cfg)
    splits = ["train"] + [split for subs in tasks.values() for split in subs.values()]
    parts = [cfg.select.aggregate, list(cfg.data.targets), [list(c) for c in ckpts]]
    for ckpt, _ in ckpts:
        for split in splits:
            parts.append(layout.feature_store(ckpt, split).digest())
    errors = layout.errors("train")
    parts.append(os.path.getsize(errors) if os.path.exists(errors) else 0)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class StaleInputs(RuntimeError):
    """Features (or scores) made from other input files or settings than this config names."""


def check_fresh(cfg: Config, layout: RunLayout) -> None:
    """Raise ``StaleInputs`` when a feature store this config reads was made from other inputs.

    For every checkpoint of the finished warmup and every split (the pool and
    each target set), the settings (``featurize.feature_settings``) and the
    sha256 of the data file and the checkpoint must equal what the store's
    fingerprint recorded (keys a store does not record are not compared). The message
    names the first stale store, every differing input, and the fix: a changed
    pool invalidates the warmup and every feature set (a new run directory, or
    delete ``features/`` and rerun ``icons-fast run``); a changed target file
    only its own features (delete them and rerun featurize for that split).
    """
    from icons_fast.train.checkpoint import checkpoint_sha256

    for ckpt_dir in layout.warmup_checkpoints():
        ckpt = os.path.basename(ckpt_dir)
        ckpt_sha = None
        for split, path, mode, images in split_jobs(cfg):
            store = layout.feature_store(ckpt, split)
            have = store.fingerprint
            want = feature_settings(cfg, ckpt_dir, mode, images)
            if "checkpoint_sha256" in have:  # only what the store recorded is compared (and hashed)
                ckpt_sha = ckpt_sha or checkpoint_sha256(ckpt_dir)
                want["checkpoint_sha256"] = ckpt_sha
            if path and "data_sha256" in have:
                if not os.path.exists(path):
                    raise FileNotFoundError(f"the data file {path} of split {split} does not exist (its features "
                                            f"in {store.root} were made from it); pass the file the run was made with")
                want["data_sha256"] = source_sha256(path)
            changed = [k for k in want if k in have and have[k] != want[k]]
            if not changed:
                continue
            why = []
            for k in changed:
                if k == "data_sha256":
                    why.append(f"the file {path} changed after these features were made "
                               f"(sha256 {have[k][:12]}... then, {want[k][:12]}... now)")
                elif k == "checkpoint_sha256":
                    why.append(f"the warmup checkpoint {ckpt_dir} was retrained after these features were made")
                else:
                    why.append(f"{k} was {have[k]!r}, this config says {want[k]!r}")
            if split == "train" and "data_sha256" in changed:
                fix = (f"the warmup and every feature set depend on the pool: start a new run directory, or delete "
                       f"{layout.path('features')} and rerun `icons-fast run` with the same flags (it retrains "
                       f"the warmup on the new pool)")
            elif {"data_sha256", "checkpoint_sha256"} & set(changed):
                config = f" --config {layout.config}" if os.path.exists(layout.config) else ""
                fix = (f"delete {layout.path('features', '*', split)} and rerun `icons-fast featurize{config} "
                       f"--out {layout.root} --split {split}`, or pass the inputs the run was made with")
            else:  # only settings differ: most likely flags not repeated
                fix = (f"pass the settings the features were made with (`--config {layout.config}` holds them), "
                       f"or featurize again under these settings into a new run directory")
            raise StaleInputs(f"the features of {split} @ {ckpt} in {store.root} are stale: {'; '.join(why)}. "
                              f"Fix: {fix}")


def check_complete(store, n: int, errors_path: str, what: str) -> None:
    """Refuse a feature set where a sample has neither features nor an error record.

    Such a sample comes from a featurize that has not finished (a process of a
    job array still running or killed): scoring it would silently drop
    samples, so the fix is to rerun featurize for the missing ranges.
    """
    from icons_fast.data import ErrorLog

    accounted = store.coverage(n)
    if os.path.exists(errors_path):
        excluded = np.array(sorted({e.index for e in ErrorLog.read(errors_path)}), dtype=np.int64)
        accounted[excluded[excluded < n]] = True
    missing = np.flatnonzero(~accounted)
    if len(missing):
        raise RuntimeError(
            f"features of {what} are incomplete: {len(missing)} of {n} samples have neither features nor an error "
            f"record (first missing index {missing[0]}). Rerun `icons-fast featurize` (every --shard i/n) to finish."
        )


def _target_store(layout: RunLayout, ckpt: str, split: str):
    """A complete, non-empty target split's store."""
    store = layout.feature_store(ckpt, split)
    check_complete(store, int(store.fingerprint["n_samples"]), layout.errors(split), f"{split} @ {ckpt}")
    if sum(e["rows"] for e in store.entries()) == 0:
        raise ValueError(
            f"target split {split!r} has no usable sample under {ckpt}: every one was excluded "
            f"(see {layout.errors(split)}); fix the target file or its image folder (--target-image-folder)"
        )
    return store


def _cosine_targets(layout: RunLayout, ckpt: str, split: str) -> torch.Tensor:
    """A target split's unit features ``[M, k]``, read through its FAISS index."""
    _target_store(layout, ckpt, split)
    return target_vectors(layout.features(ckpt, split))


def _raw_targets(layout: RunLayout, ckpt: str, split: str) -> torch.Tensor:
    """A target split's raw projections ``p = n * f`` ``[M, k]`` float32 (TracIn)."""
    _, _, feats, norms = _target_store(layout, ckpt, split).load()
    return raw_projections(feats, norms)


def aligned_blocks(stores: list, block_size: int, keep: np.ndarray, raw: bool = False):
    """Yield ``(indices, [features per store])`` over the sample indices where ``keep`` is True.

    Every store is read in sample-index order; rows outside ``keep`` (absent
    from some checkpoint) are dropped, so the stores' row sequences are the
    same and blocks line up exactly. With ``raw`` the features are the raw
    projections ``norms * features`` (float32) instead of the stored unit rows.
    """
    iters = [s.iter_blocks(block_size) for s in stores]
    buffers: list[list] = [[] for _ in stores]  # per store: list of (indices, features)
    exhausted = [False] * len(stores)

    def fill(i: int) -> None:
        while not exhausted[i] and sum(len(b[0]) for b in buffers[i]) < block_size:
            try:
                idx, _ids, feats, norms = next(iters[i])
            except StopIteration:
                exhausted[i] = True
                return
            mask = keep[idx]
            rows = raw_projections(feats[torch.from_numpy(mask)], norms[mask]) if raw else feats[torch.from_numpy(mask)]
            buffers[i].append((idx[mask], rows))

    def take(i: int, n: int):
        idx = np.concatenate([b[0] for b in buffers[i]])
        feats = torch.cat([b[1] for b in buffers[i]])
        buffers[i] = [(idx[n:], feats[n:])] if n < len(idx) else []
        return idx[:n], feats[:n]

    while True:
        for i in range(len(stores)):
            fill(i)
        n = min(sum(len(b[0]) for b in buf) for buf in buffers)
        if n == 0:
            if any(sum(len(b[0]) for b in buf) for buf in buffers):
                raise RuntimeError("feature stores disagree on their sample indices; rerun featurize")
            return
        parts = [take(i, n) for i in range(len(stores))]
        for idx, _ in parts[1:]:
            if not np.array_equal(idx, parts[0][0]):
                raise RuntimeError("feature stores are not aligned by sample index; rerun featurize")
        yield parts[0][0], [f for _, f in parts]


def _score_pool(cfg: Config, layout: RunLayout, read_target, aggregate: str, normalise: bool, block_size: int):
    """Stream the pool against every checkpoint's targets: ``(scores [N, T] NaN where invalid, names, valid, ckpts)``."""
    ckpts = layout.checkpoint_lrs()
    tasks = _tasks(cfg)
    targets_per_ckpt = []
    for ckpt, _ in ckpts:
        targets = {}
        for task, subs in tasks.items():
            feats = {sub: read_target(layout, ckpt, split) for sub, split in subs.items()}
            targets[task] = feats[None] if list(feats) == [None] else feats
        targets_per_ckpt.append(targets)
    stores = [layout.feature_store(ckpt, "train") for ckpt, _ in ckpts]
    n = int(stores[0].fingerprint["n_samples"])
    for (ckpt, _), store in zip(ckpts, stores):
        check_complete(store, n, layout.errors("train"), f"train @ {ckpt}")
    valid = np.logical_and.reduce([s.coverage(n) for s in stores])
    scores, rows, names = stream_task_influence(
        aligned_blocks(stores, block_size, valid, raw=not normalise),
        targets_per_ckpt if len(ckpts) > 1 else targets_per_ckpt[0],
        aggregate=aggregate,
        checkpoint_weights=[lr for _, lr in ckpts],
        progress=True,
        normalise=normalise,
    )
    out = np.full((n, len(names)), np.nan, dtype=np.float32)
    out[rows] = scores
    return out, names, valid, ckpts


def run_influence(cfg: Config, run_dir: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> dict:
    """Write ``scores/`` (see the module docstring) unless it is up to date; return its paths.

    ``I_t(i) = max_s sum_c w_c agg_{v in s} <f_c(i), f_c(v)>`` with ``w_c`` the
    checkpoints' learning rates, renormalised, and ``agg`` = ``cfg.select.aggregate``.
    """
    layout = RunLayout(run_dir or cfg.out)
    with writer_lock(layout.root, "influence", cfg):
        check_fresh(cfg, layout)
        inputs = scores_inputs(cfg, layout)
        paths = layout.score_files()
        if (scores_meta(layout) or {}).get("inputs_fingerprint") == inputs:
            log.info("[influence] scores in %s are up to date", layout.scores)
            return paths
        try:
            return _write_scores(cfg, layout, inputs, block_size)
        except CorruptShard as exc:
            raise explain_corrupt(exc, layout.root) from exc


def _write_scores(cfg: Config, layout: RunLayout, inputs: str, block_size: int) -> dict:
    paths = layout.score_files()
    out, names, valid, ckpts = _score_pool(cfg, layout, _cosine_targets, cfg.select.aggregate, True, block_size)
    os.makedirs(layout.scores, exist_ok=True)
    atomic_npy(paths["scores"], out)
    atomic_npy(paths["valid"], valid)
    weights = checkpoint_weights_normalised([lr for _, lr in ckpts], len(ckpts))
    atomic_json(paths["task_names"], {"task_names": names, "checkpoints": [c for c, _ in ckpts],
                                     "checkpoint_weights": weights,
                                     "aggregate": cfg.select.aggregate, "inputs_fingerprint": inputs})
    log.info("[influence] %d of %d samples scored against %d task(s): %s", int(valid.sum()), len(valid), len(names), names)
    return paths


def run_tracin_scores(cfg: Config, run_dir: str | None = None,
                      block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[np.ndarray, list[str], np.ndarray]:
    """TracIn scores of a run: ``(float64 [N, T] with NaN where invalid, task names, valid [N])``.

    ``A_s(i) = sum_c w_c mean_{v in s} <p_c(i), p_c(v)>``, ``I_t(i) = max_{s in t} A_s(i)``,
    ``p = norm * unit feature`` (``select.influence.tracin_scores``, streamed from the stores).
    """
    layout = RunLayout(run_dir or cfg.out)
    check_fresh(cfg, layout)
    try:
        out, names, valid, _ = _score_pool(cfg, layout, _raw_targets, "mean", False, block_size)
    except CorruptShard as exc:
        raise explain_corrupt(exc, layout.root) from exc
    return out.astype(np.float64), names, valid

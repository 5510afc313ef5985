"""Stages 3 and 4: influence scores from the feature stores, then selection.

``run_influence`` streams each checkpoint's train features in blocks
(memory bounded by the block and by the ``N x T`` score matrix), scores them
against the target features and combines checkpoints with their learning
rates as weights (renormalised). A sample missing from any checkpoint's
features (a bad sample) gets NaN scores and ``valid = False``.

``run_select`` applies the consensus vote (or one task's top budget with
``task=``) and exports the subset in the input's own format.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from icons_fast.config import Config
from icons_fast.fileio import atomic_json, atomic_npy
from icons_fast.rundir import RunLayout, target_split


def parse_target_name(name: str) -> tuple[str, str | None]:
    """``"mme/existence"`` -> ("mme", "existence"); ``"vqa"`` -> ("vqa", None)."""
    if "/" in name:
        task, sub = name.split("/", 1)
        return task, sub
    return name, None


def target_splits(cfg: Config) -> dict[str, dict[str | None, str]]:
    """{task: {subtask or None: split name}} in config order."""
    out: dict[str, dict[str | None, str]] = {}
    for name in cfg.data.targets:
        task, sub = parse_target_name(name)
        out.setdefault(task, {})[sub] = target_split(task, sub)
    return out


def _checkpoints(layout: RunLayout) -> list[tuple[str, float]]:
    from icons_fast.train.checkpoint import load_checkpoint_state
    from icons_fast.train.warmup import current_checkpoints

    ckpts = current_checkpoints(layout.warmup)
    if not ckpts:
        raise FileNotFoundError(f"no warmup checkpoint in {layout.warmup}; run `icons-fast warmup` first")
    return [(os.path.basename(c), float(load_checkpoint_state(c)["lr"])) for c in ckpts]


def _open_store(path: str):
    from icons_fast.features.store import FeatureStore

    if not os.path.exists(os.path.join(path, "manifest.json")):
        raise FileNotFoundError(f"no features in {path}; run `icons-fast featurize` for this split first")
    return FeatureStore.open(path)


def _score_paths(layout: RunLayout) -> dict:
    return {
        "scores": os.path.join(layout.scores, "scores.npy"),
        "valid": os.path.join(layout.scores, "valid.npy"),
        "task_names": os.path.join(layout.scores, "task_names.json"),
    }


def _stored_inputs(layout: RunLayout) -> str | None:
    """The inputs fingerprint the scores on disk were made from (None when there are none)."""
    paths = _score_paths(layout)
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    with open(paths["task_names"]) as f:
        return json.load(f).get("inputs_fingerprint")


def _scores_inputs(cfg: Config, layout: RunLayout):
    """(checkpoints with lrs, {task: {subtask: split}}, fingerprint of everything the scores depend on)."""
    ckpts = _checkpoints(layout)
    tasks = target_splits(cfg)
    if not tasks:
        raise ValueError("no target task: pass --target NAME=FILE.json (repeatable)")
    splits = ["train"] + [split for subs in tasks.values() for split in subs.values()]
    return ckpts, tasks, _inputs_fingerprint(layout, ckpts, splits, cfg.select.aggregate, list(cfg.data.targets))


def _inputs_fingerprint(layout: RunLayout, ckpts, splits: list[str], aggregate: str, target_names: list) -> str:
    """sha256 of what the scores depend on: checkpoints + lrs, every shard's checksum, aggregate, tasks."""
    import hashlib

    parts = [aggregate, target_names, [list(c) for c in ckpts]]
    for ckpt, _ in ckpts:
        for split in splits:
            parts.append(_open_store(layout.features(ckpt, split)).digest())
    errors = layout.errors("train")
    parts.append(os.path.getsize(errors) if os.path.exists(errors) else 0)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


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


def _target_features(layout: RunLayout, ckpt: str, split: str) -> torch.Tensor:
    """A target split's features ``[M, k]``, read through its FAISS index (``select.neighbors``)."""
    from icons_fast.select.neighbors import target_vectors

    path = layout.features(ckpt, split)
    store = _open_store(path)
    check_complete(store, int(store.fingerprint["n_samples"]), layout.errors(split), f"{split} @ {ckpt}")
    if sum(e["rows"] for e in store.entries()) == 0:
        raise ValueError(
            f"target split {split!r} has no usable sample under {ckpt}: every one was excluded "
            f"(see {layout.errors(split)}); fix the target file or its image folder (--target-image-folder)"
        )
    return target_vectors(path)


def aligned_blocks(stores: list, block_size: int, keep: np.ndarray):
    """Yield ``(indices, [features per store])`` over the sample indices where ``keep`` is True.

    Every store is read in sample-index order; rows outside ``keep`` (absent
    from some checkpoint) are dropped, so the stores' row sequences are the
    same and blocks line up exactly.
    """
    iters = [s.iter_blocks(block_size) for s in stores]
    buffers: list[list] = [[] for _ in stores]  # per store: list of (indices, features)
    exhausted = [False] * len(stores)

    def fill(i: int) -> None:
        while not exhausted[i] and sum(len(b[0]) for b in buffers[i]) < block_size:
            try:
                idx, _ids, feats, _norms = next(iters[i])
            except StopIteration:
                exhausted[i] = True
                return
            mask = keep[idx]
            buffers[i].append((idx[mask], feats[torch.from_numpy(mask)]))

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


def run_influence(cfg: Config, run_dir: str | None = None, block_size: int = 8192) -> dict:
    """Write ``scores/scores.npy`` [N, T] float32 (NaN for excluded samples), ``task_names.json``, ``valid.npy``.

    All checkpoints are streamed together so that, per subtask, the
    checkpoint-weighted sum comes first and the max over subtasks after it
    (``I_t(i) = max_s sum_c w_c agg_{v in s} <f_c(i), f_c(v)>``); weights are the
    checkpoints' learning rates, renormalised.
    """
    from icons_fast.select.influence import checkpoint_weights_normalised, stream_task_influence

    layout = RunLayout(run_dir or cfg.out)
    ckpts, tasks, inputs = _scores_inputs(cfg, layout)
    paths = _score_paths(layout)
    if _stored_inputs(layout) == inputs:
        print(f"[influence] scores in {layout.scores} are up to date")
        return paths
    targets_per_ckpt = []
    for ckpt, _ in ckpts:
        targets = {}
        for task, subs in tasks.items():
            feats = {sub: _target_features(layout, ckpt, split) for sub, split in subs.items()}
            targets[task] = feats[None] if list(feats) == [None] else feats
        targets_per_ckpt.append(targets)
    stores = [_open_store(layout.features(ckpt, "train")) for ckpt, _ in ckpts]
    n = int(stores[0].fingerprint["n_samples"])
    for (ckpt, _), store in zip(ckpts, stores):
        check_complete(store, n, layout.errors("train"), f"train @ {ckpt}")
    valid = np.logical_and.reduce([s.coverage(n) for s in stores])
    scores, rows, names = stream_task_influence(
        aligned_blocks(stores, block_size, valid),
        targets_per_ckpt if len(ckpts) > 1 else targets_per_ckpt[0],
        aggregate=cfg.select.aggregate,
        checkpoint_weights=[lr for _, lr in ckpts],
        progress=True,
    )
    out = np.full((n, len(names)), np.nan, dtype=np.float32)
    out[rows] = scores
    os.makedirs(layout.scores, exist_ok=True)
    atomic_npy(paths["scores"], out)
    atomic_npy(paths["valid"], valid)
    weights = checkpoint_weights_normalised([lr for _, lr in ckpts], len(ckpts))
    atomic_json(paths["task_names"], {"task_names": names, "checkpoints": [c for c, _ in ckpts],
                                     "checkpoint_weights": weights,
                                     "aggregate": cfg.select.aggregate, "inputs_fingerprint": inputs})
    print(f"[influence] {int(valid.sum())} of {n} samples scored against {len(names)} task(s): {names}")
    return paths


def load_scores(run_dir: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    layout = RunLayout(run_dir)
    scores = np.load(os.path.join(layout.scores, "scores.npy"))
    valid = np.load(os.path.join(layout.scores, "valid.npy"))
    with open(os.path.join(layout.scores, "task_names.json")) as f:
        names = json.load(f)["task_names"]
    return scores, names, valid


def run_select(cfg: Config, run_dir: str | None = None, task: str | None = None) -> dict:
    """Vote (or one task's top budget) and export ``selection/``; return the written paths."""
    from icons_fast.select.export import export_selection, format_summary
    from icons_fast.select.voting import consensus_select, specialist_select, vote_counts

    layout = RunLayout(run_dir or cfg.out)
    if _stored_inputs(layout) != _scores_inputs(cfg, layout)[2]:
        raise RuntimeError(
            f"the scores in {layout.scores} are missing or were made from other features, targets or aggregate "
            f"than this config asks for; run `icons-fast influence` (same flags) first"
        )
    scores, names, valid = load_scores(layout.root)
    budget = cfg.select.budget
    budget = int(budget) if budget >= 1 else budget
    n_valid = int(valid.sum())
    out_dir = layout.selection if task is None else os.path.join(layout.selection, f"specialist-{task}")
    if task is None and cfg.select.rule != "icons":  # other selectors (select/rules.py) -> selection/rule-NAME/
        from icons_fast.select.rules import run_rule

        indices, info, scores, names = run_rule(cfg, layout.root, cfg.select.rule, scores, names, valid)
        out_dir, votes = os.path.join(layout.selection, f"rule-{cfg.select.rule}"), None
    elif task is None:
        indices, info = consensus_select(
            np.nan_to_num(scores, nan=-np.inf), budget=budget, top_percent=cfg.select.top_percent,
            tie_break=cfg.select.tie_break, seed=cfg.seed, valid=valid, return_info=True,
        )
        top_percent = cfg.select.top_percent or (100.0 * budget if budget < 1 else 100.0 * budget / n_valid)
        votes = vote_counts(np.nan_to_num(scores, nan=-np.inf), top_percent=top_percent, valid=valid)
    else:
        if task not in names:
            raise ValueError(f"unknown task {task!r}; tasks with scores: {names}")
        indices = specialist_select(np.nan_to_num(scores, nan=-np.inf), names.index(task), budget, valid=valid)
        info = {"rule": f"specialist:{task}", "selected": int(len(indices))}
        votes = None
    info["excluded_bad_samples"] = int((~valid).sum())
    # The ids the features were made for guard the export against a changed or shifted pool file.
    ckpt = _checkpoints(layout)[-1][0]
    feature_ids = _open_store(layout.features(ckpt, "train")).sample_ids()
    paths = export_selection(
        cfg.data.train_data, indices, out_dir, scores=scores, task_names=names, votes=votes, info=info,
        sample_ids=[feature_ids[int(i)] for i in indices],
    )
    print(format_summary(info, names) if "vote_histogram" in info else f"[select] {info.get('rule')}: {len(indices)} samples")
    print(f"[select] wrote {out_dir}")
    return paths

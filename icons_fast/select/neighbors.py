"""FAISS-indexed target features in a run directory, and ``icons-fast neighbors``.

Each target split's features get an ``IndexFlatIP`` saved beside them
(``features/<ckpt>/<split>/faiss.index``, rebuilt when the features change).
The influence stage reads its target side from these indexes; retrieval
answers, per checkpoint:

- for a target sample, the train samples with the largest influence on it;
- for a train sample, the target samples it serves most.

Scores are cosine similarities of the stored (projected, preconditioned)
gradient features, i.e. single-checkpoint influence.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from icons_fast.features.store import FeatureStore
from icons_fast.fileio import atomic_json

INDEX_FILE = "faiss.index"
INDEX_META = "faiss.index.json"


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def target_index(feature_dir: str):
    """The split's FAISS index (built and saved on first use or when its features changed)."""
    from icons_fast.select.faiss_index import build_target_index, load_index, save_index

    store = FeatureStore.open(feature_dir)
    digest = store.digest()
    path, meta = os.path.join(feature_dir, INDEX_FILE), os.path.join(feature_dir, INDEX_META)
    if os.path.exists(path) and os.path.exists(meta):
        with open(meta) as f:
            if json.load(f).get("features") == digest:
                return load_index(path), store
    indices, ids, feats, _ = store.load()
    index = build_target_index(feats)
    save_index(index, path)
    atomic_json(meta, {"features": digest, "indices": indices.tolist(), "ids": ids}, indent=None)
    return index, store


def target_vectors(feature_dir: str) -> torch.Tensor:
    """``[M, k]`` fp32 target features: from the FAISS index when faiss is installed, else from the store."""
    if have_faiss():
        from icons_fast.select.faiss_index import index_vectors

        return index_vectors(target_index(feature_dir)[0])
    return FeatureStore.open(feature_dir).load()[2].float()


def neighbors(train_dir: str, target_dir: str, m: int = 10, block_size: int = 65536,
              train_rows: list[int] | None = None) -> dict:
    """Top-m retrieval both ways between one checkpoint's train and target features.

    Returns ``{"per_target": [{index, id, neighbors: [{index, id, score}]}],
    "per_train": [...]}`` (``per_train`` only for the sample indices in ``train_rows``).
    Sample indices and ids come from the stores, never from row positions.
    """
    from icons_fast.select.faiss_index import top_targets_for_train, top_train_for_targets

    index, tstore = target_index(target_dir)
    t_idx, t_ids, _, _ = tstore.load(verify=False)
    train = FeatureStore.open(train_dir)
    row_index, row_ids = [], []

    def blocks():
        for idx, ids, feats, _ in train.iter_blocks(block_size):
            row_index.append(idx)
            row_ids.extend(ids)
            yield feats

    scores, rows = top_train_for_targets(blocks(), index, m)
    all_idx = np.concatenate(row_index)
    out = {"per_target": [], "per_train": []}
    for j in range(len(t_idx)):
        out["per_target"].append({
            "index": int(t_idx[j]), "id": t_ids[j],
            "neighbors": [{"index": int(all_idx[r]), "id": row_ids[r], "score": float(s)}
                          for s, r in zip(scores[j].tolist(), rows[j].tolist())],
        })
    if train_rows:
        wanted = set(int(i) for i in train_rows)
        found = {}  # sample index -> (id, feature row), gathered block by block (never the whole pool)
        for idx, ids, feats, _ in train.iter_blocks(block_size, verify=False):
            for p in np.flatnonzero(np.isin(idx, list(wanted))):
                found[int(idx[p])] = (ids[p], feats[p])
        missing = [i for i in train_rows if int(i) not in found]
        if missing:
            raise ValueError(f"train samples {missing[:5]} have no features (excluded as bad samples?)")
        s2, r2 = top_targets_for_train(torch.stack([found[int(i)][1] for i in train_rows]), index, m)
        for i, srow, rrow in zip(train_rows, s2.tolist(), r2.tolist()):
            out["per_train"].append({
                "index": int(i), "id": found[int(i)][0],
                "neighbors": [{"index": int(t_idx[r]), "id": t_ids[r], "score": float(s)} for s, r in zip(srow, rrow)],
            })
    return out

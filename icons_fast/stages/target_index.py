"""The FAISS index kept beside each target split's features.

Reads ``features/<ckpt>/<split>/`` (the FeatureStore); writes, beside it,
``faiss.index`` (an ``IndexFlatIP`` of the unit target rows,
``select.faiss_index``) and ``faiss.index.json`` (the store digest it was
built from, the rows' sample indices and ids). The index is rebuilt when the
features change. The influence stage reads its target side from these
indexes and the neighbors stage searches them.
"""
from __future__ import annotations

import json
import os

import torch

from icons_fast.features.store import FeatureStore
from icons_fast.fileio import atomic_json

INDEX_FILE = "faiss.index"
INDEX_META = "faiss.index.json"


def have_faiss() -> bool:
    """True when ``faiss`` can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def target_index(feature_dir: str):
    """``(index, store)``: the split's FAISS index (built and saved on first use or when its features changed)."""
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

"""Nearest-neighbour influence retrieval, with rows named by sample index and id.

For one checkpoint, with a FAISS target index (``faiss_index.build_target_index``)
over target features ``t`` and train features ``x`` (both taken unit-norm)::

    score(i, j) = <x_i / ||x_i||, t_j / ||t_j||>       (single-checkpoint cosine influence)

- ``train_for_targets``: for each target sample, the ``m`` train samples with the
  largest score (the train side streamed in blocks, ``faiss_index.top_train_for_targets``);
- ``targets_for_train``: for given train samples, the ``m`` targets they serve most.

Rows are named by the sample indices and ids passed with them, never by
position, so the answer stays right when samples were excluded. Arrays in,
records out: reading the feature stores is ``icons_fast.stages.neighbors``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch


def _named(scores: Sequence[float], rows: Sequence[int], indices, ids) -> list[dict]:
    """``[{index, id, score}]`` for the ``rows`` of a side named by ``indices`` / ``ids``."""
    return [{"index": int(indices[r]), "id": ids[r], "score": float(s)} for s, r in zip(scores, rows)]


def train_for_targets(index, target_indices, target_ids: Sequence, blocks: Iterable, m: int) -> list[dict]:
    """Per target row of ``index``: ``{index, id, neighbors: [{index, id, score}] * m}``, best first.

    Arguments:
        index: FAISS target index, rows in the order of ``target_indices`` / ``target_ids``.
        blocks: iterable of ``(sample indices [n], ids [n], features Tensor[n, k])`` train blocks.
        m: neighbours per target.
    """
    from icons_fast.select.faiss_index import top_train_for_targets

    row_index, row_ids = [], []

    def feats():
        for idx, ids, x in blocks:
            row_index.append(np.asarray(idx))
            row_ids.extend(ids)
            yield x

    scores, rows = top_train_for_targets(feats(), index, m)
    all_idx = np.concatenate(row_index)
    return [
        {"index": int(target_indices[j]), "id": target_ids[j],
         "neighbors": _named(scores[j].tolist(), rows[j].tolist(), all_idx, row_ids)}
        for j in range(len(target_indices))
    ]


def targets_for_train(index, target_indices, target_ids: Sequence, train_indices: Sequence[int],
                      train_ids: Sequence, train_feats: torch.Tensor, m: int) -> list[dict]:
    """Per given train sample: ``{index, id, neighbors: [{index, id, score}] * m}`` over the targets, best first.

    ``train_feats``: ``[q, k]``, row ``r`` the features of ``train_indices[r]`` / ``train_ids[r]``.
    """
    from icons_fast.select.faiss_index import top_targets_for_train

    scores, rows = top_targets_for_train(train_feats, index, m)
    return [
        {"index": int(i), "id": sid, "neighbors": _named(srow, rrow, target_indices, target_ids)}
        for i, sid, srow, rrow in zip(train_indices, train_ids, scores.tolist(), rows.tolist())
    ]

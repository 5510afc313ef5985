"""Options beside the paper's rule for two ways a consensus selection can go wrong.

Arrays in, indices out; nothing here reads a run directory. The paper's rule
(``icons``) stays the default; these are opt-in and measured in
``benchmarks/quality.py``.

- Redundancy: a pool with near-duplicates (the same conversation on a
  re-rendered image) gives near-identical gradient features, so a selection
  that likes one copy takes all of them. :func:`near_duplicate_groups` links
  every pair of pool samples whose unit features have cosine >= ``threshold``
  (FAISS range search over an exact inner-product index; a plain numpy
  reference beside it) and labels each connected group by its lowest index;
  :func:`collapse_near_duplicates` keeps that one representative.
- Starvation: when the target tasks disagree, the samples several tasks vote
  for come from a few tasks, and a task can end up with almost nothing.
  :func:`quota_vote` keeps the vote's order but caps what each task can claim:
  every sample has a home task (the one where its percentile rank is highest),
  and each task may claim ``budget / T`` samples in vote order; what is left of
  the budget is filled in vote order regardless of home.
"""
from __future__ import annotations

import numpy as np

from icons_fast.select.inputs import budget_count, checked_scores
from icons_fast.select.voting import percentile_ranks, vote_counts


def _unit_rows(features) -> np.ndarray:
    """``[N, k]`` -> C-contiguous float32 rows of unit L2 norm (zero rows stay 0)."""
    x = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(np.divide(x, norms, out=np.zeros_like(x), where=norms > 0))


def similar_pairs_ref(features, threshold: float) -> np.ndarray:
    """Plain numpy reference: every pair ``(i, j)``, ``i < j``, with ``cos(f_i, f_j) >= threshold``. ``[P, 2]``."""
    x = _unit_rows(features)
    sim = x @ x.T
    i, j = np.nonzero(np.triu(sim >= threshold, k=1))
    return np.stack([i, j], axis=1).astype(np.int64)


def similar_pairs(features, threshold: float, block_size: int = 4096) -> np.ndarray:
    """The pairs of :func:`similar_pairs_ref` through a FAISS ``IndexFlatIP`` range search (``[P, 2]``, sorted)."""
    import faiss

    x = _unit_rows(features)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    pairs = []
    for b0 in range(0, x.shape[0], block_size):
        # A tiny margin so that float32 rounding cannot drop a pair sitting exactly on the threshold.
        lims, dist, ids = index.range_search(x[b0 : b0 + block_size], float(threshold) - 1e-6)
        for q in range(len(lims) - 1):
            i = b0 + q
            found = ids[lims[q] : lims[q + 1]]
            sims = dist[lims[q] : lims[q + 1]]
            keep = found[(found > i) & (sims >= threshold - 1e-6)]
            pairs.extend((i, int(j)) for j in keep)
    out = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    return out


def near_duplicate_groups(features, threshold: float = 0.95, valid=None) -> np.ndarray:
    """Group label per sample: the lowest index of its connected group of near-duplicates.

    Arguments:
        features: ``[N, k]`` pool features (any scale; compared by cosine).
        threshold: two samples are linked when their cosine is >= ``threshold``.
        valid: boolean ``[N]``; invalid samples get label -1 and link nothing.
    Return:
        int64 ``ndarray[N]``; ``labels[i] == i`` for a group's representative.
    """
    x = np.asarray(features)
    n = x.shape[0]
    v = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    parent = np.arange(n)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in similar_pairs(x, threshold):
        if v[i] and v[j]:
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)
    labels = np.array([root(i) for i in range(n)], dtype=np.int64)
    labels[~v] = -1
    return labels


def collapse_near_duplicates(features, threshold: float = 0.95, valid=None) -> np.ndarray:
    """Boolean ``[N]`` keep mask: one representative (the lowest index) per near-duplicate group."""
    labels = near_duplicate_groups(features, threshold, valid)
    return labels == np.arange(labels.shape[0])


def vote_order(scores, top_percent: float, valid=None) -> np.ndarray:
    """Valid indices in ICONS's order: votes descending, then mean percentile rank descending, then index."""
    s = np.asarray(scores, dtype=np.float64)
    v = np.ones(s.shape[0], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    return _ranked_vote_order(s, top_percent, v)[0]


def _ranked_vote_order(s: np.ndarray, top_percent: float, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`vote_order` and the percentile ranks of those samples, ``[n_valid, T]`` in the same order."""
    votes = vote_counts(s, top_percent, v)
    idx = np.flatnonzero(v)
    ranks = percentile_ranks(s, v, rows=idx)
    pos = np.lexsort((idx, -ranks.mean(axis=1), -votes[idx]))
    return idx[pos], ranks[pos]


def quota_vote(scores, budget, valid=None, top_percent: float | None = None) -> np.ndarray:
    """The consensus vote with a per-task quota of ``budget / T`` (see the module docstring).

    Arguments:
        scores: ``[N, T]`` per-task influence scores.
        budget: a fraction of the valid samples in (0, 1) (``int(budget * N_valid)``) or a count.
        valid: boolean ``[N]``; invalid samples are never selected.
        top_percent: the vote threshold; defaults to the budget's percentage.
    Return:
        int64 ``ndarray[count]``, ascending.
    """
    s, v = checked_scores(scores, valid)  # float64 [N, T], bool [N]: the vote's own input checks
    n, t = s.shape
    n_valid = int(v.sum())
    count, _ = budget_count(budget, n_valid)
    if top_percent is None:
        top_percent = 100.0 * count / n_valid
    order, ranks = _ranked_vote_order(s, top_percent, v)
    home = np.full(n, -1)
    home[order] = np.argmax(ranks, axis=1)  # the task where the sample ranks highest
    quota = np.full(t, count // t)
    quota[: count % t] += 1
    taken = np.zeros(n, dtype=bool)
    n_taken = 0
    for i in order:
        if quota[home[i]] > 0:
            quota[home[i]] -= 1
            taken[i] = True
            n_taken += 1
    for i in order:  # fill what the quotas left over (tasks with too few home samples), in vote order
        if n_taken >= count:
            break
        if not taken[i]:
            taken[i] = True
            n_taken += 1
    return np.flatnonzero(taken).astype(np.int64)
